"""Shared fixtures: tiny random models built from the configs in a second (no training, no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The tiny models are far too small for intra-op threads to help; on CI's 2 shared cores they only contend (a
# generate step was ~25x slower with 2 threads than with 1 while other work ran).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sft_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An sft export folder of the tiny preset with random weights (seeded, so its greedy answers are stable)."""
    from hydra import compose, initialize_config_dir

    from vlm.cli import CONFIG_DIR
    from vlm.config import to_train_config
    from vlm.loading import export_vlm, new_vlm

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = to_train_config(compose("train", overrides=["stage=sft"]))
    torch.manual_seed(0)
    bundle = new_vlm(cfg.model, cfg.tiler)
    return export_vlm(tmp_path_factory.mktemp("tiny") / "export", bundle, "sft", cfg.tiler)


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_sft_export: Path):
    """`vlm.chat.ChatModel` on the CPU over `tiny_sft_export`, loaded once per test session."""
    from vlm.chat import ChatModel

    return ChatModel.load(tiny_sft_export, device="cpu")
