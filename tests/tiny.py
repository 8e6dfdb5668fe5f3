"""Tiny random models and configs for tests: composed from the real configs with small sizes, never downloaded."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from vlm.cli import CONFIG_DIR
from vlm.config import TrainConfig, to_train_config

TINY = [
    "model.vision.width=32", "model.vision.depth=2", "model.vision.heads=2",
    "model.text.width=32", "model.text.heads=2", "model.text.layers=1", "model.clip.embed_dim=32",
    "model.llm.config.hidden_size=32", "model.llm.config.intermediate_size=64",
    "model.llm.config.num_hidden_layers=2", "model.llm.config.num_attention_heads=2",
    "model.llm.config.num_key_value_heads=2",
]


def tiny_config(*overrides: str, stage: str = "contrastive", tiny: bool = True) -> TrainConfig:
    """The composed config with `overrides`; `tiny` shrinks the default model to a few thousand parameters."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return to_train_config(compose("train", overrides=[f"stage={stage}", *(TINY if tiny else []), *overrides]))
