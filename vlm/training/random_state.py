"""The random number generators' place in their streams, saved with each checkpoint and restored on resume.

A run seeds torch and Python's `random` once, from trainer.seed, before it starts. Without this a resumed run would seed
them the same way again and so draw the dropout masks (and any other random choice of the training step) of step 0
once more; with it, the resumed run draws what the interrupted one would have drawn next.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import torch

from vlm.training.strategy import every_rank, this_ranks


class RandomState(pl.Callback):
    """Saves every rank's generator states in each checkpoint and gives each rank its own back on resume.

    Ranks are seeded alike but draw differently (dropout over packed rows of different widths), so each rank's states
    are its own. CUDA keeps one state per device: each rank saves and restores its own device's. A resume on another
    number of ranks gives every rank rank 0's states."""

    KEY = "vlm_random_state"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if pl_module.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(pl_module.device)
        checkpoint[self.KEY] = {"ranks": every_rank(state)}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(self.KEY)
        if saved is None:  # a checkpoint written before the states were saved: the seeds of a fresh start
            return
        state = this_ranks(saved, trainer)
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and pl_module.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], pl_module.device)
