"""Gradient-norm clipping that also works when every rank holds only a shard of each gradient (FSDP)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.distributed.fsdp import FullyShardedDataParallel


def clip_gradients(module: pl.LightningModule, optimizer: torch.optim.Optimizer, clip_val: float | None,
                   algorithm: str | None) -> None:
    """Lightning's gradient clipping, except under FSDP. There each rank holds a shard of every gradient, so the norm
    must be reduced across ranks: FSDP's own `clip_grad_norm_` does that (Lightning refuses to clip by norm there)."""
    root = module.trainer.strategy.model
    if isinstance(root, FullyShardedDataParallel) and clip_val and algorithm in (None, "norm"):
        root.clip_grad_norm_(clip_val)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm)
