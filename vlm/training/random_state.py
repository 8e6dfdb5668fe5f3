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


class RandomState(pl.Callback):
    """Saves the generators' states in each checkpoint and sets them from it on resume.

    Every rank is seeded alike and draws alike (dropout on equal-sized batches), so rank 0's states, the ones its
    checkpoint holds, are every rank's. CUDA keeps one state per device: each rank saves and restores its own device's,
    so a resume on another number of GPUs still loads."""

    KEY = "vlm_random_state"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if pl_module.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(pl_module.device)
        checkpoint[self.KEY] = state

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(self.KEY)
        if state is None:  # a checkpoint written before the states were saved: the seeds of a fresh start
            return
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and pl_module.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], pl_module.device)
