"""Which held-out samples a validation scores: the first `eval.max_samples` of them (`SampleLimit`), and under DDP each
rank its share (`HeldOutShare`).

Validation is split over DDP ranks: every rank reads every held-out batch, scores every n-th one, and the scores come
back together in batch order, so validating on n GPUs takes about 1/n of the time and reports what one process would.

Every rank still reads (and decodes) every batch: the held-out shards are read unsplit, so the ranks step through the
same batches, and DDP's per-step buffer broadcast lines up on every rank. Under FSDP each rank scores every batch, as
one process does: a sharded forward needs every rank at every step, running the same modules in the same order, which
batches of different contents (pairs on one rank, conversations on another, answers of other lengths) would not.
"""

from __future__ import annotations

from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from vlm.training.strategy import every_rank

Scored = TypeVar("Scored")
Sample = TypeVar("Sample")


class SampleLimit:
    """`eval.max_samples` over one validation: how many of each held-out batch's rows and samples count. Every rank
    counts every batch, so the limit cuts at the same sample whichever rank scores it."""

    def __init__(self, limit: int | None):
        self.limit = limit  # None: every sample counts
        self.rows_read = 0  # held-out rows read so far
        self.samples_taken = 0  # samples whose turns were handed out to be answered so far

    def rows(self, count: int) -> int:
        """How many of the next batch's `count` rows count towards the limit."""
        before, self.rows_read = self.rows_read, self.rows_read + count
        return count if self.limit is None else min(count, max(0, self.limit - before))

    def samples(self, samples: list[Sample]) -> list[Sample]:
        """The next batch's samples whose turns are answered: those still within the limit."""
        if self.limit is not None:
            samples = samples[: max(0, self.limit - self.samples_taken)]
        self.samples_taken += len(samples)
        return samples


class HeldOutShare:
    """Which held-out batches this rank scores (`mine`), and every rank's scores merged in batch order (`merged`)."""

    def __init__(self, rank: int = 0, ranks: int = 1):
        self.rank, self.ranks = rank, ranks

    @classmethod
    def of(cls, trainer: pl.Trainer | None) -> HeldOutShare:
        """Split over the trainer's ranks under DDP; one share holding every batch otherwise (FSDP, and DeepSpeed, a
        DDP subclass whose ZeRO stage 3 shards weights as FSDP does)."""
        if trainer is None or trainer.world_size == 1:
            return cls()
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy):
            return cls(trainer.global_rank, trainer.world_size)
        return cls()

    def mine(self, batch_idx: int) -> bool:
        return batch_idx % self.ranks == self.rank

    def merged(self, scored: list[tuple[int, Scored]]) -> list[Scored]:
        """Each rank's (batch index, score) items -> every rank's scores, ordered by batch (a batch's items keep their
        order). A collective when split: every rank calls it, also with nothing scored."""
        if self.ranks == 1:
            return [score for _, score in scored]
        everything: list[tuple[int, Any]] = [item for part in every_rank(scored) for item in part]
        return [score for _, score in sorted(everything, key=lambda item: item[0])]  # stable: a batch keeps its order
