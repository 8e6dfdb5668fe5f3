"""The optimizer and schedule every stage uses: AdamW with a parameter group per part, warmup then cosine."""

from __future__ import annotations

import logging
import math

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from vlm.config import StageConfig

log = logging.getLogger(__name__)


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # biases, norms, position and class tokens, temperatures, and embeddings named so (open_clip's, the image slots'):
    # weight decay only hurts them. The LLM's token embeddings (embed_tokens) decay, as under Hugging Face's Trainer
    return param.ndim < 2 or "embedding" in name or "logit_" in name or "cls_token" in name or "pos_embed" in name


def peak_lr(stage: StageConfig, part: str) -> float:
    """A part's peak learning rate: its own `stage.lr_<part>` where set, else `stage.lr`."""
    own = getattr(stage, f"lr_{part}", None)
    return stage.lr if own is None else own  # 0 is a rate of its own: the part keeps still


def build_optimizer(parts: dict[str, nn.Module], stage: StageConfig) -> torch.optim.Optimizer:
    """AdamW with one param group per (part, decay) so each part can have its own learning rate."""
    groups = []
    for part, module in parts.items():
        lr = peak_lr(stage, part)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if not _no_decay(n, p)]
        plain = [p for n, p in named if _no_decay(n, p)]
        groups += [{"params": decay, "lr": lr, "weight_decay": stage.weight_decay, "part": part, "decay": True},
                   {"params": plain, "lr": lr, "weight_decay": 0.0, "part": part, "decay": False}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"stage {stage.name!r} has nothing to train; check the stage.train_* settings")
    return torch.optim.AdamW(groups, betas=tuple(stage.betas), fused=torch.cuda.is_available() or None)


def warmup_cosine(optimizer: torch.optim.Optimizer, stage: StageConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio` of the peak at `max_steps`."""
    warmup, total, floor = stage.warmup_steps, stage.max_steps, stage.min_lr_ratio
    if warmup >= total and rank_zero_only.rank == 0:  # a quick run (stage.max_steps=20) under the default warmup
        log.warning("stage.warmup_steps=%d is not below stage.max_steps=%d: the learning rate never reaches its peak "
                    "and ends at %.0f%% of it; lower stage.warmup_steps for a run this short", warmup, total,
                    100 * total / warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_stage_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                         stage: StageConfig) -> None:
    """Set each param group's peak learning rate, betas and weight decay from `stage` again, and the schedule's place
    on the new peak. A resumed run restores them from its checkpoint (the optimizer's groups, the schedule's
    base_lrs), so without this a run resumed with another stage.lr would go on with the old one."""
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        peak = peak_lr(stage, group["part"])
        group["initial_lr"], group["betas"] = peak, tuple(stage.betas)
        group["weight_decay"] = stage.weight_decay if group.get("decay", group["weight_decay"] > 0) else 0.0
        group["lr"] = peak * factor(scheduler.last_epoch)  # the rate the next step takes
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
