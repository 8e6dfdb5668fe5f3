"""Checkpoints that survive crashes: atomic writes, picking the newest readable checkpoint, and the data position.

- `AtomicCheckpointIO` writes each checkpoint to a hidden temporary file in the same folder, fsyncs it, then renames
  it onto its final name. A process killed mid-write leaves a `.NAME.tmp-PID` file behind, never a truncated `.ckpt`.
- `find_resume_checkpoint` walks a run's checkpoints newest first and returns the newest one that loads, warning
  about each unreadable one it passes over (a file truncated by a full disk or copied half-way, say).
- `DataPosition` records where in the data stream a checkpoint was taken (and the skip counts so far) and reseeds
  the shard order on resume.

What "data position" means here. The shard pipelines are iterable (webdataset), so the exact sample position inside
an epoch is not recoverable without replaying the stream. A checkpoint records the epoch, the batches consumed in
it and the global step. On resume:
  - at an epoch boundary, the next epoch gets exactly the shard order the interrupted process would have used;
  - mid-epoch, the interrupted epoch restarts from its beginning with a fresh shard order, seeded from
    (seed, epoch, global step), so the run does not replay the batches it just trained on in the same order, and a
    run that keeps crashing at the same point still reaches every shard. Samples of the interrupted epoch that were
    consumed before the crash may be seen twice (at most the batches-in-epoch recorded in the checkpoint, times the
    global batch size); none are skipped. In resampled mode (no epochs) the shard draws are reseeded the same way.
The order of samples inside the shuffle buffer is not seeded by the pipeline, so it is not reproduced either way.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins import TorchCheckpointIO

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"  # partial writes are named .FINALNAME.tmp-PID: hidden, and not matched by *.ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file beside the target, fsync, then rename: a checkpoint is whole or absent."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage (s3://, gs://): fsspec's transaction is the atomic unit there
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # the bytes are on disk before the name points at them
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_directory(path.parent)  # and the rename itself survives a power cut


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """A run's checkpoints, newest first: Lightning's step checkpoints and SLURM requeue (hpc_ckpt_*) ones."""
    run_dir = Path(run_dir)
    found = [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def checkpoint_problem(path: Path) -> str | None:
    """None when `path` loads as a Lightning checkpoint, else why not. mmap reads the structure, not the tensors."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # truncated zip, empty file, bad pickle: all mean "do not resume from this"
        reason = str(err).split(". ")[0].splitlines()[0] if str(err) else "unreadable"
        return f"{type(err).__name__}: {reason}"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        return "not a Lightning training checkpoint (no state_dict / global_step)"
    return None


def find_resume_checkpoint(run_dir: str | os.PathLike, set_aside: bool = True) -> Path | None:
    """The newest checkpoint of a run that loads, or None; each unreadable newer one is named in a warning.

    With `set_aside`, an unreadable checkpoint is renamed to NAME.corrupt: kept for a post-mortem, out of every later
    search, and out of the way of the resumed run, which writes that step again under the same name.
    """
    for path in checkpoint_candidates(Path(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        aside = path.with_name(path.name + ".corrupt")
        if set_aside:
            with contextlib.suppress(FileNotFoundError):  # another rank set it aside first
                path.rename(aside)
        log.warning("checkpoint %s cannot be loaded (%s)%s; trying the one before it", path, problem,
                    f", so it was renamed to {aside.name}" if set_aside else "")
    return None


def remove_partial_writes(run_dir: str | os.PathLike) -> None:
    """Delete temporary files left by a process killed while writing a checkpoint (they are never resumed from)."""
    run_dir = Path(run_dir)
    for leftover in [*(run_dir / "checkpoints").glob(f".*{TEMP_MARK}*"), *run_dir.glob(f".*{TEMP_MARK}*")]:
        log.info("removing %s, a checkpoint whose writer was interrupted", leftover)
        leftover.unlink(missing_ok=True)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step a checkpoint was taken at."""
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts. On resume, keep the rows logged before
    the checkpoint's step instead (the rows after it belong to steps the resumed run trains again)."""

    def __init__(self, log_dir: str, resume_step: int):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") and int(float(row["step"])) < self.resume_step]
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = header  # new columns are added to this header, old ones kept


class ContinuingCSVLogger(CSVLogger):
    """A CSVLogger whose metrics.csv runs on across `resume=auto` restarts instead of starting over."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self.resume_step is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self.resume_step)
        return super().experiment


def pass_seed(seed: int, epoch: int, global_step: int) -> int:
    """The data seed of a pass that restarts epoch `epoch` mid-way at `global_step`: stable, and far from seed + k."""
    digest = hashlib.sha256(f"vlm-data/{seed}/{epoch}/{global_step}".encode()).digest()
    return int.from_bytes(digest[:6], "little") + 2**32


class DataPosition(pl.Callback):
    """Saves where in the data stream each checkpoint was taken; on resume, seeds the shard order from it.

    It also carries the task's sample counts (`health.seen`, `health.skipped`) across restarts, so the skip rate and
    metrics.json count the whole run. Under DDP the counts are rank 0's, as in metrics.json.

    The DataModule builds its pipeline from `datamodule.seed`, and webdataset shuffles the shards of the n-th pass
    through it in this process with seed + n (resampled mode: draws seeded from seed and n). A resumed process counts
    passes from 0 again, so without this it would replay the first epoch's shard order whatever epoch it resumed in.
    """

    KEY = "vlm_data_position"

    def __init__(self) -> None:
        self.epoch = 0  # the epoch being trained
        self.batches_in_epoch = 0  # batches consumed in it, by this rank
        self.first_epoch = 0  # the epoch of this process's first pass (its seed + 0)

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        # runs before ModelCheckpoint's hook for the same batch (Lightning orders checkpoint callbacks last); counted
        # here rather than in on_train_epoch_start, which Lightning skips for an epoch it resumes into
        if trainer.current_epoch != self.epoch:
            self.epoch, self.batches_in_epoch = trainer.current_epoch, 0
        self.batches_in_epoch += 1

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # a save on an epoch's last batch resumes into the next epoch (Lightning knows it is the last: it fetches
        # one batch ahead)
        last = bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False))
        checkpoint[self.KEY] = {"epoch": trainer.current_epoch + last, "batches_in_epoch": 0 if last
                                else self.batches_in_epoch, "global_step": trainer.global_step,
                                "first_epoch": self.first_epoch, "seed": int(getattr(trainer.datamodule, "seed", 0))}
        health = getattr(pl_module, "health", None)  # the task's DataHealth: skip counts span restarts
        if health is not None:
            checkpoint[self.KEY].update(samples_seen=health.seen, samples_skipped=health.skipped)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Lightning calls this after reading the checkpoint and before it builds the train DataLoader
        position = checkpoint.get(self.KEY)
        if position is None:
            return
        health = getattr(pl_module, "health", None)
        if health is not None and "samples_seen" in position:
            health.seen, health.skipped = position["samples_seen"], position["samples_skipped"]
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "seed"):
            return
        self.epoch, self.batches_in_epoch = position["epoch"], position["batches_in_epoch"]
        self.first_epoch = self.epoch
        if self.batches_in_epoch == 0:  # the shard order the interrupted process would have used next
            datamodule.seed = position["seed"] + self.epoch - position["first_epoch"]
            log.info("data: resuming at the start of epoch %d (step %d)", self.epoch, position["global_step"])
        else:
            datamodule.seed = pass_seed(position["seed"], self.epoch, position["global_step"])
            log.info("data: resuming %d batches into epoch %d (step %d); the epoch restarts with a fresh shard order, "
                     "so up to %d batches per rank of it may be seen twice", self.batches_in_epoch, self.epoch,
                     position["global_step"], self.batches_in_epoch)
