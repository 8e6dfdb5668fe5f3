"""Resume discovery: which checkpoint of a run `resume=auto` continues from.

The run's checkpoints are tried newest first; the newest one that loads wins, and each unreadable newer one (a file
truncated by a full disk or copied half-way, say) is named in a warning and set aside.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from vlm.training.checkpoint_io import TEMP_MARK

log = logging.getLogger(__name__)


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
