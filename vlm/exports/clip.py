"""Phase 1 exports: the contrastive model with its CLIP tokenizer (the BPE vocabulary travels with the weights), the
class names and prompt templates it was validated with, and the ViT that phase 2 starts from."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
from safetensors import safe_open

from vlm.config import TilerConfig, model_config_from, to_dict
from vlm.data.tiler import Tiler
from vlm.exports.format import (
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    ExportMeta,
    load_weights,
    read_meta,
    write_export,
)
from vlm.models.clip import CLIPModel
from vlm.models.factory import make_tiler
from vlm.models.vision import VisionTower

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
TOKENIZER_SETTINGS = "open_clip_tokenizer.json"
DEFAULT_TEMPLATES = ["a photo of a {}."]


@dataclass
class ClipBundle:
    model: CLIPModel
    tokenizer: open_clip.tokenizer.SimpleTokenizer
    tiler: Tiler
    classnames: list[str] | None  # the labels of `held_out`, the held-out data its run validated on
    templates: list[str]
    held_out: str | None = None


def export_clip(directory: Path, model: CLIPModel, tokenizer: open_clip.tokenizer.SimpleTokenizer,
                tiler: TilerConfig, classnames: list[str] | None, templates: list[str],
                train_config: dict[str, Any] | None = None) -> Path:
    meta = ExportMeta(stage="contrastive", model=to_dict(model.config), tiler=to_dict(tiler), classnames=classnames,
                      templates=list(templates), train_config=train_config)
    return write_export(directory, model, meta, lambda path: save_clip_tokenizer(tokenizer, path))


def load_clip(directory: str | Path) -> ClipBundle:
    meta = read_meta(directory, expect_stage=("contrastive",))
    model = CLIPModel(model_config_from(meta.model))
    load_weights(model, directory)
    model.eval()
    return ClipBundle(model, load_clip_tokenizer(Path(directory).expanduser() / TOKENIZER_DIR),
                      make_tiler(TilerConfig(**meta.tiler), model.visual), meta.classnames,
                      meta.templates or DEFAULT_TEMPLATES, (meta.train_config or {}).get("held_out"))


def load_vision_from_clip(vision: VisionTower, directory: str | Path) -> None:
    """Copy the ViT of a contrastive export into `vision`, built with the export's vision settings (phase 2 starts
    from the phase 1 image tower)."""
    read_meta(directory, expect_stage=("contrastive",))
    with safe_open(str(Path(directory).expanduser() / WEIGHTS_FILE), framework="pt") as f:
        state = {k.removeprefix("visual."): f.get_tensor(k) for k in f.keys() if k.startswith("visual.")}
    vision.load_state_dict(state)


def save_clip_tokenizer(tokenizer: open_clip.tokenizer.SimpleTokenizer, directory: Path) -> None:
    """Copy the BPE vocabulary next to the weights so the export folder needs nothing else."""
    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        raise ValueError(f"exporting a {type(tokenizer).__name__} text tokenizer is not supported; use a CLIP BPE one")
    shutil.copy(open_clip.tokenizer.default_bpe(), directory / BPE_FILE)
    (directory / TOKENIZER_SETTINGS).write_text(json.dumps({"context_length": tokenizer.context_length}))


def load_clip_tokenizer(directory: Path) -> open_clip.tokenizer.SimpleTokenizer:
    settings = json.loads((directory / TOKENIZER_SETTINGS).read_text())
    return open_clip.tokenizer.SimpleTokenizer(bpe_path=str(directory / BPE_FILE), **settings)

