"""Where in the data stream a checkpoint was taken, and the shard order a resumed run continues with.

The shard pipelines are iterable (webdataset), so the exact sample position inside an epoch is not recoverable without
replaying the stream. A checkpoint records the epoch, the batches consumed in it and the global step. On resume:
  - at an epoch boundary, the next epoch gets exactly the shard order the interrupted process would have used;
  - mid-epoch, the interrupted epoch restarts from its beginning with a fresh shard order, seeded from
    (seed, epoch, global step), so the run does not replay the batches it just trained on in the same order, and a
    run that keeps crashing at the same point still reaches every shard. Samples of the interrupted epoch that were
    consumed before the crash may be seen twice (at most the batches-in-epoch recorded in the checkpoint, times the
    global batch size); none are skipped. In resampled mode (no epochs) the shard draws are reseeded the same way.
The shuffle buffer is seeded the same way (seed + pass, per rank and worker), so at an epoch boundary the resumed
run also reads the samples in the uninterrupted run's order.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import lightning.pytorch as pl

from vlm.training.strategy import every_rank, this_ranks

log = logging.getLogger(__name__)


def pass_seed(seed: int, epoch: int, global_step: int) -> int:
    """The data seed of a pass that restarts epoch `epoch` mid-way at `global_step`: stable, and far from seed + k."""
    digest = hashlib.sha256(f"vlm-data/{seed}/{epoch}/{global_step}".encode()).digest()
    return int.from_bytes(digest[:6], "little") + 2**32


class DataPosition(pl.Callback):
    """Saves where in the data stream each checkpoint was taken; on resume, seeds the shard order from it.

    It also carries the run's totals across restarts, so the skip rate and metrics.json count the whole run: the
    task's sample counts (the checkpoint holds every rank's totals, and a resumed run gives them back to rank 0, see
    `DataHealth.restore`) and the wall time (each earlier session's up to the checkpoint the next one resumed from).

    The DataModule builds its pipeline from `datamodule.seed`, and webdataset shuffles the shards of the n-th pass
    through it in this process with seed + n (resampled mode: draws seeded from seed and n). A resumed process counts
    passes from 0 again, so without this it would replay the first epoch's shard order whatever epoch it resumed in.
    """

    KEY = "vlm_data_position"

    def __init__(self, session_started: float) -> None:
        self.session_started = session_started  # time.time() when this process started the run
        self.earlier_seconds = 0.0  # the wall time of the sessions before it, up to the checkpoint it resumed from
        self.epoch = 0  # the epoch this rank is training (ranks with unequal shards pass epochs at other steps)
        self.batches_in_epoch = 0  # batches consumed in it, by this rank
        self.first_epoch = 0  # the epoch of this process's first pass (its seed + 0)
        # this rank's epoch minus Lightning's count: a resumed run counts from the epoch of rank 0's checkpoint
        self.epoch_offset = 0

    def run_seconds(self) -> float:
        """The run's wall time so far, over every session of it."""
        return self.earlier_seconds + time.time() - self.session_started

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        # runs before ModelCheckpoint's hook for the same batch (Lightning orders checkpoint callbacks last); counted
        # here rather than in on_train_epoch_start, which Lightning skips for an epoch it resumes into
        epoch = trainer.current_epoch + self.epoch_offset
        if epoch != self.epoch:
            self.epoch, self.batches_in_epoch = epoch, 0
        self.batches_in_epoch += 1

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # a save on an epoch's last batch resumes into the next epoch (Lightning knows it is the last: it fetches
        # one batch ahead). The epoch is the one counted here, of the last batch trained: the run's final save comes
        # after fit, when Lightning has already counted one more
        last = bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False))
        mine = {"epoch": self.epoch + last, "batches_in_epoch": 0 if last else self.batches_in_epoch,
                "first_epoch": self.first_epoch, "seed": int(getattr(trainer.datamodule, "seed", 0))}
        # each rank's own (the top level is rank 0's), so each resumes where its own shards were
        checkpoint[self.KEY] = {**mine, "ranks": every_rank(mine), "global_step": trainer.global_step,
                                "wall_seconds": self.run_seconds()}
        health = getattr(pl_module, "health", None)  # the task's DataHealth: skip counts span restarts
        if health is not None:
            checkpoint[self.KEY].update(samples_seen=health.total_seen, samples_skipped=health.total_skipped)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Lightning calls this after reading the checkpoint and before it builds the train DataLoader
        position = checkpoint.get(self.KEY)
        if position is None:
            return
        self.earlier_seconds = position.get("wall_seconds", 0.0)
        health = getattr(pl_module, "health", None)
        if health is not None and "samples_seen" in position:
            health.restore(position["samples_seen"], position["samples_skipped"], trainer.global_rank)
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "seed"):
            return
        mine = this_ranks(position, trainer)
        self.epoch, self.batches_in_epoch = mine["epoch"], 0  # mid-epoch too: the epoch's pass starts afresh
        self.first_epoch = self.epoch
        self.epoch_offset = self.epoch - position["epoch"]  # Lightning resumes counting from rank 0's epoch
        step = position["global_step"]
        if mine["batches_in_epoch"] == 0:  # the shard order the interrupted process would have used next
            datamodule.seed = mine["seed"] + self.epoch - mine["first_epoch"]
            log.info("data: resuming at the start of epoch %d (step %d)", self.epoch, step)
        else:
            datamodule.seed = pass_seed(mine["seed"], self.epoch, step)
            log.info("data: resuming %d batches into epoch %d (step %d); the epoch restarts with a fresh shard order, "
                     "so up to %d batches of it may be seen twice on this rank", mine["batches_in_epoch"], self.epoch,
                     step, mine["batches_in_epoch"])
