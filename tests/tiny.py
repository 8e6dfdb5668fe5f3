"""Tiny random models and configs for tests: composed from the real configs with small sizes, never downloaded."""

from __future__ import annotations

from pathlib import Path

from vlm.cli import compose_config
from vlm.config import TrainConfig, to_train_config
from vlm.data.sources import DataSources
from vlm.training.stages import get_stage
from vlm.training.task import StageTask

TINY = [
    "model.vision.width=32", "model.vision.depth=2", "model.vision.heads=2",
    "model.text.width=32", "model.text.heads=2", "model.text.layers=1", "model.clip.embed_dim=32",
    "model.llm.config.hidden_size=32", "model.llm.config.intermediate_size=64",
    "model.llm.config.num_hidden_layers=2", "model.llm.config.num_attention_heads=2",
    "model.llm.config.num_key_value_heads=2",
]


def tiny_config(*overrides: str, stage: str = "contrastive", tiny: bool = True) -> TrainConfig:
    """The composed config with `overrides`; `tiny` shrinks the default model to a few thousand parameters."""
    return to_train_config(compose_config("train", [f"stage={stage}", *(TINY if tiny else []), *overrides]))


def make_task(config: TrainConfig, classnames: list[str] | None = None, init_from: Path | None = None) -> StageTask:
    """The stage's task for `config`, as `vlm.train` builds it, without data."""
    stage = get_stage(config.stage.name)
    return stage.task.create(config, stage, init_from, DataSources(None, None, classnames))
