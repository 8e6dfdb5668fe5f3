"""Tiny random models and configs for tests: composed from the real configs with small sizes, never downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from vlm.cli import compose_config
from vlm.config import TrainConfig, to_train_config
from vlm.data.sources import DataSources
from vlm.exports.clip import export_clip
from vlm.exports.vlm import export_vlm
from vlm.models.clip import CLIPModel
from vlm.models.factory import new_vlm
from vlm.models.text import clip_tokenizer
from vlm.training.stages import get_stage
from vlm.training.task import StageTask

TINY = [
    "model.vision.width=32", "model.vision.depth=2", "model.vision.heads=2",
    "model.text.width=32", "model.text.heads=2", "model.text.layers=1", "model.clip.embed_dim=32",
    "model.llm.config.hidden_size=32", "model.llm.config.intermediate_size=64",
    "model.llm.config.num_hidden_layers=2", "model.llm.config.num_attention_heads=2",
    "model.llm.config.num_key_value_heads=2",
]

# timm's registered `test_vit` (160 px, patch 16, width 64, 6 blocks): a tower open_clip can build by name
REGISTERED_VIT = ["model.vision.name=test_vit", "model.vision.image_size=160", "model.vision.patch_size=16",
                  "model.vision.width=null", "model.vision.depth=null", "model.vision.heads=null",
                  "model.vision.conv_stem=false", "model.vision.global_pool=null"]


def tiny_config(*overrides: str, stage: str = "contrastive", tiny: bool = True) -> TrainConfig:
    """The composed config with `overrides`; `tiny` shrinks the default model to a few thousand parameters."""
    return to_train_config(compose_config("train", [f"stage={stage}", *(TINY if tiny else []), *overrides]))


def make_task(config: TrainConfig, classnames: list[str] | None = None, init_from: Path | None = None) -> StageTask:
    """The stage's task for `config`, as `vlm.train` builds it, without data."""
    stage = get_stage(config.stage.name)
    return stage.task.create(config, stage, init_from, DataSources(None, None, classnames))


def contrastive_export(folder: Path, *overrides: str) -> Path:
    """A contrastive export of the tiny model with `overrides`, random weights (seeded) and a trained-looking
    temperature and SigLIP bias (neither at its initial value), so a wrong copy of either shows."""
    config = tiny_config(*overrides)
    torch.manual_seed(0)
    model = CLIPModel(config.model).eval()
    with torch.no_grad():
        model.head.logit_scale.fill_(3.0)
        if model.head.logit_bias is not None:
            model.head.logit_bias.fill_(-3.7)
    return export_clip(folder, model, clip_tokenizer(config.model.text), config.tiler, None, ["a photo of a {}."])


def sft_export(folder: Path, *overrides: str) -> Path:
    """An sft export of the tiny model with `overrides` and random weights (seeded)."""
    config = tiny_config(*overrides, stage="sft")
    torch.manual_seed(0)
    return export_vlm(folder, new_vlm(config.model, config.tiler), "sft", config.tiler)
