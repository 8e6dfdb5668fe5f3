"""Resume discovery: which checkpoint `resume=auto` continues from, and which export it builds its model from.

The run's checkpoints are tried newest first; the newest one that loads wins, and each unreadable newer one (a file
truncated by a full disk or copied half-way, say) is named in a warning and set aside.

Every checkpoint records the export its run started from (`RunRecord`). A resumed run builds its model from that
export again, as its first session did, and only then loads the checkpoint's weights: so the architecture and tokenizer
are the export's whatever the command line says, and `stage=dpo` gets its frozen reference back from the export
instead of from a second copy of the weights in every checkpoint. A `stage=dpo` run that chose the newest preference
pairs itself continues on those pairs, whatever `vlm.constitution` wrote since.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vlm.config import ConfigError, TrainConfig, to_dict
from vlm.data.shards import ShardError, list_shards
from vlm.data.sources import DataSources
from vlm.errors import UserError, first_line
from vlm.training.checkpoint_io import TEMP_MARK
from vlm.training.freezing import TRAIN_FLAGS, parts_with_overrides, trainable_parts

log = logging.getLogger(__name__)


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """A run's checkpoints, furthest first: Lightning's step checkpoints and SLURM requeue (hpc_ckpt_*) ones, by the
    step each records (a copy, rsync or download resets modification times), then by time. Unreadable ones come
    first, so that the search names them and sets them aside."""
    run_dir = Path(run_dir)
    found = [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]

    def order(path: Path) -> tuple[float, int, str]:
        record = checkpoint_record(path)
        step = record["global_step"] if isinstance(record, dict) else math.inf
        return step, path.stat().st_mtime_ns, path.name

    ordered = []
    for path in found:
        with contextlib.suppress(FileNotFoundError):  # set aside by another rank (torchrun) since the listing
            ordered.append((order(path), path))
    return [path for _, path in sorted(ordered, reverse=True)]


# what resuming reads of a checkpoint besides its weights, and of those their shapes
RECORD_KEYS = ("global_step", "init_from", "vlm_stage", "vlm_stage_settings", "vlm_data", "vlm_run_settings")
WEIGHT_SHAPES = "weight_shapes"


def checkpoint_record(path: str | os.PathLike) -> dict | str:
    """A checkpoint's `RECORD_KEYS` entries, or why it does not load as a Lightning checkpoint. Read once per file
    version however many questions a resume asks of it; mmap reads the pickled structure, not the tensors."""
    path = Path(path)
    stat = path.stat()
    return _record(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


class CheckpointUnreadable(UserError, RuntimeError):
    """A checkpoint that may well be whole but cannot be read here: it is neither resumed from nor set aside."""


# errors that say the environment, not the file, is at fault: a module or class the pickle names is missing (a
# package uninstalled or downgraded), or the file may not be read
ENVIRONMENT_ERRORS = (ImportError, AttributeError, PermissionError)


@functools.lru_cache(maxsize=8)
def _record(path: str, mtime_ns: int, size: int) -> dict | str:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except ENVIRONMENT_ERRORS as err:
        raise CheckpointUnreadable(f"checkpoint {path} cannot be read here ({first_line(err)}): the file may be "
                                   f"whole, so it was left as it is. Resume with the packages that wrote it, or with "
                                   f"read access to it") from None
    except Exception as err:  # truncated zip, empty file, bad pickle: all mean "do not resume from this"
        return first_line(err)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        return "not a Lightning training checkpoint (no state_dict / global_step)"
    shapes = {key: tuple(value.shape) for key, value in checkpoint["state_dict"].items() if hasattr(value, "shape")}
    return {key: checkpoint.get(key) for key in RECORD_KEYS} | {WEIGHT_SHAPES: shapes}


def checkpoint_problem(path: Path) -> str | None:
    """None when `path` loads as a Lightning checkpoint, else why not."""
    record = checkpoint_record(path)
    return record if isinstance(record, str) else None


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
    """Delete what a process killed while writing left behind: temporary checkpoint files (never resumed from) and
    export staging folders (.export.<random>.partial)."""
    run_dir = Path(run_dir)
    for leftover in [*(run_dir / "checkpoints").glob(f".*{TEMP_MARK}*"), *run_dir.glob(f".*{TEMP_MARK}*")]:
        log.info("removing %s, a checkpoint whose writer was interrupted", leftover)
        leftover.unlink(missing_ok=True)
    for staging in run_dir.glob(".*.partial"):
        log.info("removing %s, an export whose writer was interrupted", staging)
        shutil.rmtree(staging, ignore_errors=True)


def set_aside_newer(resume_from: Path) -> list[Path]:
    """Rename the checkpoints of `resume_from`'s run taken at later steps to NAME.superseded: they belong to the
    branch a resume from an earlier step leaves, and `resume=auto` must continue the new branch, not them."""
    step = checkpoint_step(resume_from)
    newer = [path for path in checkpoint_candidates(resume_from.parent.parent)
             if path.resolve() != resume_from.resolve() and isinstance(checkpoint_record(path), dict)
             and checkpoint_step(path) > step]
    for path in newer:
        with contextlib.suppress(FileNotFoundError):  # another rank set it aside first
            path.rename(path.with_name(path.name + ".superseded"))
    return newer


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step a checkpoint was taken at."""
    return int(checkpoint_record(path)["global_step"])


# entries: the export the run started from (None: fresh), its stage, its stage.* settings, the data it reads and the
# other settings a resume is warned about changing (`run_settings`)
STARTING_EXPORT_KEY, STAGE_KEY, STAGE_SETTINGS_KEY, DATA_KEY, RUN_SETTINGS_KEY = RECORD_KEYS[1:]
# beyond stage.*: what a run trains on and how its steps are taken, which a resume may change but should hear about
RESUME_WATCHED = {"trainer": ("seed", "precision", "devices", "num_nodes", "strategy", "gradient_clip_val"),
                  "data": ("train", "val", "shuffle_buffer", "resampled", "packing", "length_group_batches",
                           "synthetic"),
                  "model.llm": ("attention", "sparse")}  # the attention a phase 2 run trains with is not its export's


def run_settings(config: TrainConfig) -> dict[str, Any]:
    """`RESUME_WATCHED` settings of `config` by their dotted keys, data.synthetic's one by one."""
    flat = {}
    for section, keys in RESUME_WATCHED.items():
        part = config
        for name in section.split("."):
            part = getattr(part, name)
        values = to_dict(part)
        for key in keys:
            value = values[key]
            items = value.items() if isinstance(value, dict) else [("", value)]
            flat.update({f"{section}.{key}" + (f".{inner}" if inner else ""): v for inner, v in items})
    return flat


class NewestCheckpoints(ModelCheckpoint):
    """Lightning's ModelCheckpoint, keeping the save_top_k newest step checkpoints of the run's folder, whichever
    session wrote them. Lightning prunes only those it saved itself in this session, so every resume would leave
    behind the one it resumed from and the earlier session's final save (each with its optimizer state)."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.keep_newest(trainer)

    def keep_newest(self, trainer: pl.Trainer) -> None:
        """Delete all but the save_top_k newest `step*.ckpt` files of the folder (by the step in their names)."""
        if not trainer.is_global_zero or "://" in str(self.dirpath):  # remote folders: Lightning's own pruning
            return
        saved = sorted(Path(self.dirpath).glob("step*.ckpt"), key=lambda path: (len(path.name), path.name))
        for old in saved[:-self.save_top_k]:
            old.unlink(missing_ok=True)


class RunRecord(pl.Callback):
    """Writes into every checkpoint what a resume rebuilds the run from: the export folder it started from, its
    stage and stage.* settings, and its data's shard patterns (with, for preference pairs of vlm.constitution, the
    export whose answers they are)."""

    def __init__(self, init_from: Path | None, data: DataSources | None = None):
        self.init_from, self.data = init_from, data

    def on_save_checkpoint(self, trainer: pl.Trainer, task: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[STARTING_EXPORT_KEY] = str(self.init_from) if self.init_from else None
        checkpoint[STAGE_KEY] = task.stage.name
        checkpoint[STAGE_SETTINGS_KEY] = to_dict(task.config.stage)
        checkpoint[RUN_SETTINGS_KEY] = run_settings(task.config)
        if self.data is not None:
            checkpoint[DATA_KEY] = {"train": self.data.train, "val": self.data.val, "made_by": self.data.made_by}


def recorded_pairs(path: str | os.PathLike) -> DataSources | None:
    """The preference pairs of vlm.constitution that the run of checkpoint `path` chose as the newest when it started
    (None: it read other data, or the checkpoint predates the record). Pairs that are gone are an error: continuing
    on others would change what the run learns from half-way."""
    recorded = checkpoint_record(path)[DATA_KEY]
    if not recorded or not recorded["made_by"]:
        return None
    for key, pattern in (("data.train", recorded["train"]), ("data.val", recorded["val"])):
        try:
            if pattern:
                list_shards(pattern, key)
        except ShardError as err:
            raise ConfigError(f"resuming from {str(path)!r} continues on the preference pairs its run started with, "
                              f"and they are gone ({err}). Put them back, or pass data.train= and data.val= to "
                              f"continue on other pairs") from None
    return DataSources(recorded["train"], recorded["val"], None, recorded["made_by"])


def warn_changed_settings(path: Path, config: TrainConfig, table_entry: frozenset[str]) -> None:
    """Say which stage.* and `RESUME_WATCHED` settings a resumed run changes from those checkpoint `path` trained
    with: the steps before it trained with the old values, and the run's config.json and export record the new ones.
    A change of what trains (`stage.train_*`, against the stage table's `table_entry`) is refused: the checkpoint's
    optimizer state is for the parts that trained."""
    record = checkpoint_record(path)
    recorded = record[STAGE_SETTINGS_KEY]
    if not recorded:  # an older checkpoint, without the record
        return
    settings = config.stage
    now = to_dict(settings)
    before = parts_with_overrides(table_entry, {part: recorded.get(key) for part, key in TRAIN_FLAGS.items()})
    if before != (after := trainable_parts(table_entry, settings)):
        from vlm.training.stages import get_stage  # the stage table imports the tasks, which import this module

        keys = ", ".join(f"stage.{key}={now[key]}" for key in TRAIN_FLAGS.values() if now[key] != recorded.get(key))
        other_parts = ("start a new run from this run's export (init_from=...) to train other parts"
                       if get_stage(settings.name).previous else
                       f"start a new run without resume= (stage={settings.name} starts from fresh or pretrained "
                       f"weights, not from an export) to train other parts")
        raise ConfigError(f"{keys} changes what {path.name} trained ({' + '.join(sorted(before))}) to "
                          f"{' + '.join(sorted(after))}: its optimizer state holds the parts it trained. Resume "
                          f"with the settings it trained with, or {other_parts}")
    changed = [f"stage.{key}: {recorded[key]!r} -> {now[key]!r}" for key in sorted(now.keys() & recorded.keys())
               if now[key] != recorded[key]]
    run_before, run_now = record[RUN_SETTINGS_KEY] or {}, run_settings(config)  # none in older checkpoints
    changed += [f"{key}: {run_before[key]!r} -> {run_now[key]!r}" for key in sorted(run_now.keys() & run_before.keys())
                if run_now[key] != run_before[key]]
    if changed:
        log.warning("resuming with settings other than those the run trained with until %s: %s. The steps before it "
                    "trained with the old values; the run's config.json and export will record the new ones",
                    path.name, "; ".join(changed))


def refuse_unfitting_weights(path: Path, task: pl.LightningModule) -> None:
    """A run built from its settings (no starting export) resumes only into the model those settings build: with a
    model.* setting changed (a width, the loss's bias), Lightning's load would fail deep inside with a traceback."""
    saved = checkpoint_record(path)[WEIGHT_SHAPES]  # the checkpoint as the resume has read it already
    built = {key: tuple(value.shape) for key, value in task.state_dict().items()}
    problems = [*(f"{key} is not in it" for key in sorted(built.keys() - saved.keys())),
                *(f"{key} is not in the model" for key in sorted(saved.keys() - built.keys())),
                *(f"{key} is {saved[key]} in it and {built[key]} in the model"
                  for key in sorted(built.keys() & saved.keys()) if saved[key] != built[key])]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ConfigError(f"{path.name} holds the weights of another model than these model.* settings build ({shown}):"
                          f" resume with the model settings the run started with")


def recorded_stage(path: Path) -> str | None:
    """The stage of the run that wrote checkpoint `path`: recorded in it, or for older checkpoints the run folder's
    place (OUTPUT_ROOT/STAGE/RUN/checkpoints/NAME.ckpt); None if neither tells."""
    recorded = checkpoint_record(path)[STAGE_KEY]
    if recorded is None and len(path.parents) > 2 and path.parent.name == "checkpoints":
        recorded = path.parents[2].name
    return recorded


def recorded_start(path: str | os.PathLike) -> Path | None:
    """The export folder the run of checkpoint `path` started from (None: fresh weights, or a checkpoint older than
    the record, which holds every weight itself). A recorded folder that is gone is an error: the model cannot be
    rebuilt as the run built it."""
    recorded = checkpoint_record(path)[STARTING_EXPORT_KEY]
    if recorded is None:
        return None
    if not Path(recorded).is_dir():
        raise ConfigError(f"resuming from {str(path)!r} needs the export its run started from, {recorded!r}, which is "
                          f"gone: the model (its architecture, tokenizer and, for dpo, the frozen reference) is "
                          f"rebuilt from it before the checkpoint's weights load. Put it back at that path")
    return Path(recorded)
