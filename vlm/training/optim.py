"""The optimizer and schedule every stage uses: AdamW with a parameter group per part, warmup then cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlm.config import StageConfig


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # biases, norms, embeddings, temperatures: weight decay only hurts them
    return param.ndim < 2 or "embedding" in name or "logit_" in name or "cls_token" in name or "pos_embed" in name


def build_optimizer(parts: dict[str, nn.Module], stage: StageConfig) -> torch.optim.Optimizer:
    """AdamW with one param group per (part, decay) so each part can have its own learning rate."""
    groups = []
    for part, module in parts.items():
        lr = getattr(stage, f"lr_{part}", None) or stage.lr
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if not _no_decay(n, p)]
        plain = [p for n, p in named if _no_decay(n, p)]
        groups += [{"params": decay, "lr": lr, "weight_decay": stage.weight_decay, "part": part},
                   {"params": plain, "lr": lr, "weight_decay": 0.0, "part": part}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"stage {stage.name!r} has nothing to train; check the stage.train_* settings")
    return torch.optim.AdamW(groups, betas=tuple(stage.betas), fused=torch.cuda.is_available() or None)


def warmup_cosine(optimizer: torch.optim.Optimizer, stage: StageConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio` of the peak at `max_steps`."""
    warmup, total, floor = stage.warmup_steps, stage.max_steps, stage.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
