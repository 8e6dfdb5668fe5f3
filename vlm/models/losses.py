"""Contrastive losses: open_clip's ClipLoss and SigLipLoss, gathered across ranks. One registry, loud failures."""

from __future__ import annotations

from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from vlm.config import ClipHeadConfig


def build_contrastive_loss(config: ClipHeadConfig, rank: int = 0, world_size: int = 1) -> nn.Module:
    """The loss module; call it as loss(**model_outputs, output_dict=True) -> {"contrastive_loss": ...}."""
    if config.loss == "clip":
        return ClipLoss(local_loss=config.local_loss, gather_with_grad=config.gather_with_grad, cache_labels=True,
                        rank=rank, world_size=world_size)
    if config.loss == "siglip":
        return SigLipLoss(cache_labels=True, rank=rank, world_size=world_size)
    raise ValueError(f"unknown model.clip.loss {config.loss!r}; choose one of ['clip', 'siglip']")
