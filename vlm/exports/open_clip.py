"""`format=open_clip`: a contrastive export as an open_clip model folder.

It writes `open_clip_config.json` (model and preprocessing settings) and `open_clip_model.safetensors`, so that
`open_clip.create_model_and_transforms("local-dir:DIR")` and `open_clip.get_tokenizer("local-dir:DIR")` rebuild the
same model offline. open_clip builds a timm image tower from a registered name only (`timm_model_name`, with the
model's own sizes), so a tower qualifies when its settings are those of a registered timm model: no conv stem, and
width, depth, heads, image and patch size left at (or set to) the registered model's values.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file

from vlm.config import ModelConfig
from vlm.exports.clip import load_clip
from vlm.exports.format import ConversionError, read_meta, refuse_taken, staged_folder, write_provenance
from vlm.models.clip import CLIPModel

log = logging.getLogger("vlm.export")
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def registered_vit(name: str) -> dict[str, Any]:
    """The sizes timm registers for `name`, read from a weightless (meta-device) instance."""
    try:
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as err:
        raise ConversionError(f"model.vision.name={name!r} is not a registered timm model ({err})") from None
    return {"image_size": vit.patch_embed.img_size[0], "patch_size": vit.patch_embed.patch_size[0],
            "width": vit.embed_dim, "depth": len(vit.blocks), "heads": vit.blocks[0].attn.num_heads,
            "global_pool": vit.global_pool, "class_token": getattr(vit, "cls_token", None) is not None}


def refuse_unbuildable_tower(config: ModelConfig, registered: dict[str, Any]) -> None:
    """One ConversionError naming every vision setting open_clip cannot build (so one retraining fixes them all)."""
    vision = config.vision
    problems = []
    if vision.conv_stem:
        problems.append("model.vision.conv_stem=true: open_clip has no convolutional stem")
    for key in ("image_size", "patch_size", "width", "depth", "heads"):
        value = getattr(vision, key)
        if value is not None and value != registered[key]:
            problems.append(f"model.vision.{key}={value}: {vision.name!r} is registered with {registered[key]}")
    pool, registered_pool = vision.global_pool, registered["global_pool"]
    if pool == "avg" and registered["class_token"]:  # vlm's mean pooling drops the CLS token (timm_overrides)
        problems.append(f"model.vision.global_pool='avg' removes the CLS token {vision.name!r} is registered with, "
                        f"which open_clip keeps (use null: {registered_pool!r} pooling, as registered)")
    elif pool is not None and pool != registered_pool:  # open_clip pools as timm registers the tower
        problems.append(f"model.vision.global_pool={pool!r}: {vision.name!r} is registered with {registered_pool!r} "
                        f"(use {registered_pool} or null)")
    if problems:
        fix = " ".join([*(f"model.vision.{key}={registered[key]}" for key in ("image_size", "patch_size")),
                        *(f"model.vision.{key}=null" for key in ("width", "depth", "heads"))])
        raise ConversionError(
            "format=open_clip cannot build this export's image tower: open_clip makes timm towers from a registered "
            "name (timm_model_name) at its registered sizes only.\n  - " + "\n  - ".join(problems) + "\n"
            f"Train the contrastive stage with a tower it can build, e.g. model.vision.conv_stem=false "
            f"model.vision.global_pool=null {fix} (the registered model's sizes)")


def open_clip_settings(config: ModelConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """open_clip_config.json for `config`; a vision setting open_clip cannot express raises ConversionError."""
    vision = config.vision
    registered = registered_vit(vision.name)
    refuse_unbuildable_tower(config, registered)
    model_cfg: dict[str, Any] = {
        "embed_dim": config.clip.embed_dim,
        "vision_cfg": {"timm_model_name": vision.name, "timm_model_pretrained": False,
                       "timm_pool": vision.global_pool or registered["global_pool"], "timm_proj": "linear",
                       "timm_proj_bias": False, "image_size": registered["image_size"]},
        "text_cfg": {"context_length": config.text.context_length, "vocab_size": config.text.vocab_size,
                     "width": config.text.width, "heads": config.text.heads, "layers": config.text.layers},
        "quick_gelu": config.text.quick_gelu,  # the text tower's activation (the timm trunk keeps its own)
    }
    if config.clip.loss == "siglip":
        model_cfg["init_logit_bias"] = -10.0  # creates the parameter; its trained value comes with the weights
    # open_clip's "longest" mode fits the image into the square and pads, as our single-tile tier does, with the mean
    # colour (0 after normalising) given per channel: one grey level would be ~10 levels off an ImageNet or CLIP mean
    preprocess_cfg = {"size": registered["image_size"], "mean": list(mean), "std": list(std),
                      "interpolation": "bicubic", "resize_mode": "longest",
                      "fill_color": [round(channel * 255) for channel in mean]}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def open_clip_state_dict(model: CLIPModel) -> dict[str, torch.Tensor]:
    """Our parameter names -> open_clip's CLIP (timm trunk under visual.trunk, the text transformer at the top)."""
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("visual.vit."):
            name = "visual.trunk." + key.removeprefix("visual.vit.")
        elif key.startswith("text.transformer."):
            name = key.removeprefix("text.transformer.")
        elif key == "head.image_projection.weight":
            name = "visual.head.proj.weight"
        elif key in ("head.logit_scale", "head.logit_bias"):
            name, value = key.removeprefix("head."), value.reshape(())  # open_clip keeps scalars
        else:
            raise ConversionError(f"no open_clip name for parameter {key!r}")
        if name != "attn_mask":  # a causal-mask buffer open_clip rebuilds itself
            state[name] = value.detach().contiguous()
    return state


def export_open_clip(checkpoint: Path, out: Path) -> Path:
    """Convert the contrastive export `checkpoint` into the open_clip folder `out`."""
    meta = read_meta(checkpoint)
    if meta.stage != "contrastive":
        raise ConversionError(f"checkpoint={str(checkpoint)!r} holds a {meta.stage!r} model; format=open_clip takes "
                              f"a contrastive export (format=hf takes align, sft and dpo ones)")
    refuse_taken(out)  # before the model is loaded
    bundle = load_clip(checkpoint)
    settings = open_clip_settings(bundle.model.config, bundle.tiler.mean, bundle.tiler.std)
    with staged_folder(out) as staging:
        (staging / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        save_file(open_clip_state_dict(bundle.model), str(staging / WEIGHTS_FILE))
        write_provenance(staging, checkpoint, meta, "open_clip", route="open_clip CLIP with a timm tower")
    log.info("wrote %s: load it with open_clip.create_model_and_transforms('local-dir:%s')", out, out)
    return out
