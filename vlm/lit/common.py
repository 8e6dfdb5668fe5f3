"""Pieces every stage's LightningModule shares: freezing, optimizer and schedule, skip and non-finite guards."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import lightning.pytorch as pl
import torch
from torch import nn

from vlm.config import StageConfig

log = logging.getLogger(__name__)


def apply_freezing(parts: dict[str, nn.Module], trainable: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Set requires_grad per part; returns {part: (trainable params, total params)} and logs it as a table."""
    trainable = set(trainable)
    counts = {}
    for name, module in parts.items():
        for p in module.parameters():
            p.requires_grad_(name in trainable)
        total = sum(p.numel() for p in module.parameters())
        counts[name] = (total if name in trainable else 0, total)
    rows = "\n".join(f"  {name:<10} {'train ' if trained else 'frozen'} {total:>14,d}"
                     for name, (trained, total) in counts.items())
    log.info("parameters by part:\n%s\n  trainable: %s of %s", rows, f"{sum(c[0] for c in counts.values()):,d}",
             f"{sum(c[1] for c in counts.values()):,d}")
    return counts


def keep_frozen_parts_in_eval(parts: dict[str, nn.Module], trainable: Iterable[str]) -> None:
    """Frozen parts stay in eval mode while the rest trains: no dropout, and BatchNorm statistics stay put."""
    for name, module in parts.items():
        if name not in trainable:
            module.eval()


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


class TooManyBadSamples(RuntimeError):
    """More samples could not be decoded than data.max_skip_rate allows."""


class NonFiniteLoss(FloatingPointError):
    """trainer.max_nonfinite_steps non-finite losses in a row."""


class DataHealth:
    """Counts skipped samples and non-finite losses; raises when either passes its limit."""

    def __init__(self, max_skip_rate: float, max_nonfinite_steps: int, min_samples: int = 500):
        self.max_skip_rate = max_skip_rate
        self.max_nonfinite_steps = max_nonfinite_steps
        self.min_samples = min_samples
        self.seen = 0
        self.skipped = 0
        self.nonfinite_in_a_row = 0
        self.skip_pending = False  # the current step's loss was non-finite: drop its gradients before the update

    def count_batch(self, batch_size: int, skipped: int) -> None:
        self.seen += batch_size + skipped
        self.skipped += skipped
        if self.seen >= self.min_samples and self.skip_rate > self.max_skip_rate:
            raise TooManyBadSamples(f"{self.skipped} of {self.seen} samples ({self.skip_rate:.1%}) could not be "
                                    f"decoded, more than data.max_skip_rate={self.max_skip_rate}; the warnings above "
                                    f"name the shards and keys")

    @property
    def skip_rate(self) -> float:
        return self.skipped / max(1, self.seen)

    def check_loss(self, loss: torch.Tensor, step: int, module: pl.LightningModule) -> bool:
        """True when the step should run; False skips it (every rank agrees, so DDP stays in sync)."""
        bad = torch.tensor(float(not torch.isfinite(loss).all()), device=loss.device)
        if module.trainer is not None and module.trainer.world_size > 1:
            bad = module.trainer.strategy.reduce(bad, reduce_op="max")
        if bad.item() == 0:
            self.nonfinite_in_a_row = 0
            return True
        self.nonfinite_in_a_row += 1
        log.warning("non-finite loss at step %d; skipping this step (%d in a row)", step, self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise NonFiniteLoss(f"{self.nonfinite_in_a_row} non-finite losses in a row, the last at step {step}; "
                                     f"lower stage.lr or check the data (trainer.max_nonfinite_steps="
                                     f"{self.max_nonfinite_steps})")
        return False

    def guard(self, loss: torch.Tensor, step: int, module: pl.LightningModule) -> torch.Tensor:
        """The loss to backpropagate: `loss`, or for a non-finite one a zero through the same graph, so that every
        rank still runs backward (DDP and FSDP wait for it; Lightning refuses a None loss with several ranks).
        `drop_skipped_gradients`, called from on_before_optimizer_step, then leaves the optimizer nothing to apply."""
        if self.check_loss(loss, step, module):
            return loss
        self.skip_pending = True
        return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0

    def drop_skipped_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        if self.skip_pending:
            optimizer.zero_grad(set_to_none=True)  # parameters without gradients are left alone, decay included
            self.skip_pending = False

    def log_to(self, module: pl.LightningModule) -> None:
        module.log_dict({"data/skipped": float(self.skipped), "data/skip_rate": self.skip_rate}, on_step=True)


def with_gathered_weights(module: nn.Module, weights: dict[str, torch.Tensor], prefix: str = "model.") -> nn.Module:
    """`module`, a fresh unsharded copy of a task's model, loaded with the task's gathered state dict (its `model.*`
    keys). Sharded strategies (FSDP) leave no rank holding whole weights, so the export is written from this copy."""
    own = {key.removeprefix(prefix): value for key, value in weights.items() if key.startswith(prefix)}
    module.load_state_dict(own, strict=True)
    return module.eval()
