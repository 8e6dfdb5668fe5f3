"""Guards on a run's inputs and numbers: the bad-sample rate, and non-finite losses that skip their step."""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning.pytorch as pl
import torch

from vlm.errors import UserError

log = logging.getLogger(__name__)


class TooManyBadSamples(UserError, RuntimeError):
    """More samples could not be decoded than data.max_skip_rate allows."""


class NonFiniteLoss(UserError, FloatingPointError):
    """trainer.max_nonfinite_steps non-finite losses in a row."""


class DataHealth:
    """Counts skipped samples and non-finite losses; raises when either passes its limit.

    Under DDP/FSDP each rank reads its own shards. `seen` and `skipped` are this rank's counts; `total_seen` and
    `total_skipped` are every rank's, summed at each batch, and they decide the stop, so all ranks stop at the same
    step on the same numbers. A resumed run puts the checkpoint's totals on rank 0 alone (`restore`)."""

    def __init__(self, max_skip_rate: float, max_nonfinite_steps: int, min_samples: int = 500):
        self.max_skip_rate = max_skip_rate
        self.max_nonfinite_steps = max_nonfinite_steps
        self.min_samples = min_samples
        self.seen = self.skipped = 0
        self.total_seen = self.total_skipped = 0
        self.nonfinite_in_a_row = 0
        self.skip_pending = False  # the current step's loss was non-finite: drop its gradients before the update
        self.update_skipped = False  # the last optimizer step applied nothing, so the LR schedule stays put too

    def count_batch(self, batch_size: int, skipped: int,
                    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Count a training batch; `sum_over_ranks` (every rank calls it at every batch) makes the totals global."""
        self.seen += batch_size + skipped
        self.skipped += skipped
        counts = torch.tensor([self.seen, self.skipped], dtype=torch.float64)
        if sum_over_ranks is not None:
            counts = sum_over_ranks(counts)
        self.total_seen, self.total_skipped = (int(c) for c in counts.tolist())
        if self.total_seen >= self.min_samples and self.skip_rate > self.max_skip_rate:
            raise TooManyBadSamples(f"{self.total_skipped} of {self.total_seen} samples ({self.skip_rate:.1%}) could "
                                    f"not be decoded, more than data.max_skip_rate={self.max_skip_rate}; the "
                                    f"warnings above name the shards and keys")

    def restore(self, seen: int, skipped: int, rank: int) -> None:
        """The whole run's counts from a checkpoint: kept on rank 0, so that the sum over ranks counts them once."""
        self.total_seen, self.total_skipped = seen, skipped
        self.seen, self.skipped = (seen, skipped) if rank == 0 else (0, 0)

    @property
    def skip_rate(self) -> float:
        """The share of the samples read on all ranks that were skipped."""
        return self.total_skipped / max(1, self.total_seen)

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
        self.update_skipped = self.skip_pending
        if self.skip_pending:
            # parameters without gradients are left alone, decay and AdamW's step count included
            optimizer.zero_grad(set_to_none=True)
            self.skip_pending = False

    def log_to(self, module: pl.LightningModule) -> None:
        module.log_dict({"data/skipped": float(self.total_skipped), "data/skip_rate": self.skip_rate}, on_step=True)


class NoTrainingBatch(UserError, RuntimeError):
    """The training data gave no batch in whole passes over its shards."""


class EmptyPassGuard(pl.Callback):
    """Stops a run whose training data gives no batch: with steps, not epochs, ending a run (max_epochs=-1), Lightning
    would otherwise start pass after pass over shards that yield nothing, forever. A fresh run stops after one empty
    pass; a resumed one after two in a row, since it may start at the end of a pass and find nothing left in it."""

    def __init__(self) -> None:
        self.batches = 0
        self.empty_passes = 0
        self.empty_passes_allowed = 0

    def on_train_start(self, trainer: pl.Trainer, task: pl.LightningModule) -> None:
        self.empty_passes_allowed = 1 if trainer.ckpt_path else 0

    def on_train_batch_start(self, *_: object) -> None:
        self.batches += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, task: pl.LightningModule) -> None:
        self.empty_passes = 0 if self.batches else self.empty_passes + 1
        self.batches = 0
        if self.empty_passes > self.empty_passes_allowed:
            data = trainer.datamodule
            passes = "a whole pass" if self.empty_passes == 1 else f"{self.empty_passes} passes"
            raise NoTrainingBatch(
                f"data.train={data.train_pattern!r} ({len(data.train_urls)} shards) gave no training batch in "
                f"{passes}: none of its samples could be read or decoded (the warnings above say why), or it holds "
                f"fewer usable samples than stage.batch_size={data.batching.batch_size} per rank (an incomplete "
                f"batch is dropped)")
