"""format=open_clip: a contrastive export loads in stock open_clip with the same embeddings and preprocessing, and
what open_clip cannot express is refused without leaving a folder behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from tiny import REGISTERED_VIT, contrastive_export, tiny_config

from vlm.export import ExportConfig, convert
from vlm.exports.clip import load_clip
from vlm.exports.format import PROVENANCE_FILE, ConversionError
from vlm.exports.open_clip import export_open_clip


@pytest.fixture(scope="module")
def registered_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return contrastive_export(tmp_path_factory.mktemp("clip") / "export", *REGISTERED_VIT)


def test_open_clip_loads_the_same_model_tokenizer_and_preprocessing(registered_export, tmp_path):
    out = tmp_path / "open_clip"
    convert(ExportConfig(checkpoint=str(registered_export), format="open_clip", out=str(out), hf_route="auto",
                         log_level="INFO"))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    ours = load_clip(registered_export)

    captions = ["a red circle on a blue background", "two green squares"]
    ids = tokenizer(captions)
    assert torch.equal(ids, ours.tokenizer(captions))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8))
    pixels = preprocess(image).unsqueeze(0)  # (1, 3, 160, 160)
    assert torch.allclose(pixels, ours.tiler(image).pixel_values, atol=1e-6)  # same size: no resampling involved
    # other sizes are resized into the square keeping their aspect ratio, then padded; the two resamplers round apart
    # by at most one 8-bit level, and the pads are half a level apart (open_clip pads with a whole grey level)
    level = 1 / 255 / min(ours.tiler.std)
    for width, height in ((90, 50), (50, 90)):
        other = Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8))
        gap = (preprocess(other).unsqueeze(0) - ours.tiler(other).pixel_values).abs().max().item()
        assert gap <= 1.01 * level, f"{width}x{height}: {gap / level:.2f} levels apart"
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels, normalize=True), ours.model.encode_image(pixels), atol=1e-5)
        assert torch.allclose(model.encode_text(ids, normalize=True), ours.model.encode_text(ids), atol=1e-5)
        assert torch.allclose(model.logit_scale, ours.model.head.logit_scale[0])
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["source"] == str(registered_export.resolve()) and provenance["source_stage"] == "contrastive"


def test_a_quick_gelu_text_tower_loads_in_open_clip_with_its_activation(tmp_path):
    export = contrastive_export(tmp_path / "export", *REGISTERED_VIT, "model.text.quick_gelu=true")
    out = tmp_path / "open_clip"
    convert(ExportConfig(checkpoint=str(export), format="open_clip", out=str(out), hf_route="auto", log_level="INFO"))
    model = open_clip.create_model(f"local-dir:{out}").eval()
    ours = load_clip(export)
    ids = ours.tokenizer(["a red circle on a blue background"])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(ids, normalize=True), ours.model.encode_text(ids), atol=1e-5)


def test_letterboxed_borders_are_padded_with_the_towers_mean_colour_in_each_channel():
    """A tower normalised with CLIP's mean (not 0.5 in every channel): open_clip's pad must be that colour, which vlm's
    tiler pads with (0 once normalised), not one grey level for all three channels."""
    from vlm.config import TilerConfig
    from vlm.data.tiler import Tiler
    from vlm.exports.open_clip import open_clip_settings

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    cfg = open_clip_settings(tiny_config(*REGISTERED_VIT).model, mean, std)["preprocess_cfg"]
    preprocess = open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"],
                                           resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"],
                                           fill_color=cfg["fill_color"])
    tiler = Tiler(TilerConfig(max_tiles=1), tile_size=cfg["size"], tokens_per_tile=100, mean=mean, std=std)
    wide = Image.new("RGB", (160, 60), (200, 30, 90))  # fitted into 160 x 160: 50 rows of border above and below
    theirs, ours = preprocess(wide), tiler(wide).pixel_values[0]  # (3, 160, 160) each
    half_level = 0.5 / 255 / min(std)
    assert (theirs[:, :40] - ours[:, :40]).abs().max() <= half_level  # the border rows
    assert (theirs[:, 60:100] - ours[:, 60:100]).abs().max() <= 2 * half_level  # the picture (resampled alike)


def test_siglip_bias_travels(tmp_path):
    source = contrastive_export(tmp_path / "export", *REGISTERED_VIT, "model.clip.loss=siglip")
    with torch.no_grad():
        ours = load_clip(source).model
    export_open_clip(source, tmp_path / "open_clip")
    model = open_clip.create_model(f"local-dir:{tmp_path / 'open_clip'}")
    assert ours.head.logit_bias.item() == pytest.approx(-3.7)  # the trained value, not open_clip's initial -10
    assert torch.allclose(model.logit_bias, ours.head.logit_bias[0])


@pytest.mark.parametrize("overrides,named", [
    # the tiny preset: every setting that differs is named at once, so one retraining fixes them all
    ([], ["model.vision.conv_stem=true", "model.vision.width=32", "model.vision.depth=2", "model.vision.heads=2",
          "model.vision.patch_size=8", "model.vision.global_pool='avg'"]),
    ([*REGISTERED_VIT, "model.vision.depth=2"], ["model.vision.depth=2"]),
    ([*REGISTERED_VIT, "model.vision.global_pool=avg"], ["model.vision.global_pool='avg'"]),
    ([*REGISTERED_VIT, "model.vision.global_pool=max"], ["model.vision.global_pool='max'"]),
    ([*REGISTERED_VIT, "model.vision.global_pool=map"], ["model.vision.global_pool='map'"]),
    # registered with mean pooling and a CLS token (EVA02): vlm's mean pooling has none, open_clip's tower one
    (["model.vision.name=eva02_tiny_patch14_224", "model.vision.image_size=224", "model.vision.patch_size=14",
      "model.vision.width=null", "model.vision.depth=null", "model.vision.heads=null", "model.vision.conv_stem=false",
      "model.vision.global_pool=avg"],
     ["model.vision.global_pool='avg' removes the CLS token 'eva02_tiny_patch14_224' is registered with"]),
])
def test_towers_open_clip_cannot_build_are_refused_by_name(tmp_path, overrides, named):
    source = contrastive_export(tmp_path / "export", *overrides)
    with pytest.raises(ConversionError) as refusal:
        export_open_clip(source, tmp_path / "out")
    assert all(setting in str(refusal.value) for setting in named), str(refusal.value)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_a_non_empty_out_or_a_phase_2_export_is_refused(registered_export, tiny_sft_export, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        export_open_clip(registered_export, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConversionError, match="holds a 'sft' model; format=open_clip takes a contrastive export"):
        export_open_clip(tiny_sft_export, tmp_path / "out")
