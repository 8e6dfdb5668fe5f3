"""Run folders: where a run writes, which checkpoint `resume=auto` continues and which export a stage starts from.

Layout: OUTPUT_ROOT/STAGE/RUN_NAME/{checkpoints/, export/, logs/, metrics.json}.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from vlm.config import ConfigError, TrainConfig
from vlm.data.sources import DataSources
from vlm.exports.format import ExportError, is_complete, read_meta
from vlm.training.resume import (
    checkpoint_candidates,
    checkpoint_problem,
    checkpoint_record,
    checkpoint_step,
    find_resume_checkpoint,
    recorded_pairs,
    recorded_stage,
    recorded_start,
    remove_partial_writes,
    set_aside_newer,
)
from vlm.training.stages import STAGES, get_stage

log = logging.getLogger(__name__)
# Made with an exclusive create by the one process that starts a new run in a folder, so two runs started at once (in
# the same second, or under one run_name) never share it; it means nothing else, and a failed start removes it.
RUN_CLAIM = ".vlm-run"


@dataclass
class Run:
    dir: Path
    resume_from: Path | None  # Lightning checkpoint to continue from
    init_from: Path | None  # export folder the model is built from (resuming: the run's own, its weights then loaded)
    data: DataSources | None = None  # what it trains and validates on (None: the caller reads no data)

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def export(self) -> Path:
        return self.dir / "export"


def _runs(stage_dir: Path, by: str) -> list[Path]:
    """The run folders of a stage that hold `by` ("export", "checkpoints"), oldest first by when training last wrote
    it: not by the run folder's own time, which an evaluation's `eval/` folder beside the export changes."""
    runs = [p for p in stage_dir.glob("*") if p.is_dir() and not p.name.startswith(".") and (p / by).is_dir()]
    return sorted(runs, key=lambda p: (p / by).stat().st_mtime)


def latest_export(output_root: str | Path, stage: str) -> Path | None:
    """The newest complete export folder of a stage, or None."""
    exports = [run / "export" for run in _runs(Path(output_root) / stage, "export") if is_complete(run / "export")]
    return exports[-1] if exports else None


# Lightning's DDP launcher starts ranks 1..N-1 by re-running the command; these carry rank 0's choices to them so
# every rank writes to one run folder, resumes from one checkpoint and builds its model from one export, whatever the
# clock says when it starts.
RUN_DIR_ENV, RESUME_ENV, INIT_ENV, PARENT_ENV = "VLM_RUN_DIR", "VLM_RESUME_FROM", "VLM_INIT_FROM", "VLM_RUN_PARENT"


def prepare_run(config: TrainConfig, read_data: Callable[[], DataSources] | None = None) -> Run:
    """The run folder, the checkpoint to resume from and the export to start from, on every rank the same; never
    another run's folder. `read_data` gives the data the config names; a resumed run that chose the newest preference
    pairs itself continues on those instead (recorded in its checkpoint)."""
    inherited = _from_parent_rank()
    if inherited is not None:
        inherited.data, _ = _run_data(config, inherited.resume_from, read_data)
        return inherited
    if config.run_name and (Path(config.run_name).name != config.run_name or config.run_name in (".", "..")):
        raise ConfigError(f"run_name={config.run_name!r} must be a folder name, not a path: runs live in "
                          f"OUTPUT_ROOT/STAGE/RUN_NAME (set output_root= to write elsewhere)")
    stage_dir = Path(config.output_root).expanduser() / config.stage.name
    launch_name = _launch_name(named=bool(config.run_name))
    default_name = launch_name or time.strftime("%Y%m%d-%H%M%S")
    claims = _claims_new_runs()
    if config.resume == "auto":
        run_dir, resume_from = _auto_resume(config, stage_dir, default_name)
    elif config.resume:
        run_dir, resume_from = _resume_from_file(config)
    elif claims:
        run_dir, resume_from = _new_run_folder(stage_dir / (config.run_name or default_name),
                                               bool(config.run_name or launch_name)), None
    else:  # another process of a launched job: the folder the claiming one checks and claims (one name for all)
        run_dir, resume_from = stage_dir / (config.run_name or default_name), None
    data, recorded = _run_data(config, resume_from, read_data)
    # checked before the run folder is made; pairs the run has trained on already were checked when it started
    start = _start(config, resume_from, None if recorded or data is None else data.made_by)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if claims and not config.resume:
            run_dir = _claimed(run_dir, bool(config.run_name or launch_name))
    except OSError as err:  # a file where a folder must go, or no permission
        raise ConfigError(f"cannot make the run folder {str(run_dir)!r} ({err.strerror}): check output_root="
                          f"{config.output_root!r}") from None
    run = Run(run_dir, resume_from, start, data)
    os.environ.update({RUN_DIR_ENV: str(run_dir), RESUME_ENV: str(resume_from or ""),
                       INIT_ENV: str(run.init_from or ""), PARENT_ENV: str(os.getpid())})
    return run


def _auto_resume(config: TrainConfig, stage_dir: Path, default_name: str) -> tuple[Path, Path | None]:
    """resume=auto: the named run's folder, else the newest run with checkpoints, and its newest loadable checkpoint
    (None: the run starts from step 0). A finished run is refused rather than trained again."""
    if config.run_name:
        run_dir = stage_dir / config.run_name
    else:
        runs = _runs(stage_dir, "checkpoints")
        run_dir = runs[-1] if runs else stage_dir / default_name
    resume_from = None
    if run_dir.exists():
        remove_partial_writes(run_dir)
        resume_from = find_resume_checkpoint(run_dir)
    if resume_from:
        refuse_a_resume_past_the_end(resume_from, config.stage.max_steps)
    finished = is_complete(run_dir / "export")
    # at stage.max_steps there is nothing left to train (past it, refused above)
    if resume_from and finished and checkpoint_step(resume_from) == config.stage.max_steps:
        raise ConfigError(f"resume=auto: {str(run_dir)!r} is a finished run: its export is complete and its "
                          f"newest checkpoint is at step {checkpoint_step(resume_from)}, stage.max_steps="
                          f"{config.stage.max_steps}; raise stage.max_steps to train it further, or choose another "
                          f"run_name")
    if resume_from:
        log.info("resume=auto: continuing %s from %s", run_dir, resume_from.name)
    elif finished:  # finished before its first checkpoint: starting over would erase it
        raise ConfigError(f"resume=auto: {str(run_dir)!r} is a finished run (its export is complete) with no "
                          f"checkpoint to continue from; choose another run_name, or delete the folder to train "
                          f"it again")
    elif (run_dir / "checkpoints").is_dir():
        log.warning("resume=auto: no loadable checkpoint in %s, so this run starts again from step 0", run_dir)
    else:
        log.info("resume=auto: no checkpoint yet, starting %s", run_dir)
    return run_dir, resume_from


def _resume_from_file(config: TrainConfig) -> tuple[Path, Path]:
    """resume=PATH: the checkpoint, checked to load and to be this stage's, and its run's folder; later checkpoints
    of the run are set aside so that resume=auto continues this branch."""
    resume_from = Path(config.resume).expanduser()
    if resume_from.is_dir():
        candidates = checkpoint_candidates(resume_from.parent if resume_from.name == "checkpoints" else resume_from)
        newest = next((path for path in candidates if isinstance(checkpoint_record(path), dict)),
                      candidates[0] if candidates else None)  # furthest readable first
        example = f" (the newest there: {str(newest)!r})" if newest else ""
        raise ConfigError(f"resume={config.resume!r} is a folder; pass one of its .ckpt files{example}, or "
                          f"resume=auto (with run_name= for a run other than the stage's newest)")
    if not resume_from.is_file():
        raise ConfigError(f"resume={config.resume!r}: no such checkpoint file")
    if problem := checkpoint_problem(resume_from):
        raise ConfigError(f"resume={config.resume!r} cannot be loaded ({problem}); name an earlier checkpoint of "
                          f"its run, or pass resume=auto to take the newest one that loads")
    written_by = recorded_stage(resume_from)
    if written_by in STAGES and written_by != config.stage.name:  # before any folder or log is touched
        raise ConfigError(f"resume={config.resume!r} is a checkpoint of the {written_by} stage, and this run is "
                          f"stage={config.stage.name}; pass stage={written_by} to continue it")
    refuse_a_resume_past_the_end(resume_from, config.stage.max_steps)  # before the later checkpoints are moved
    if newer := set_aside_newer(resume_from):
        log.warning("resume=%s: %d later checkpoints of the run (%s) are set aside as *.superseded, so that "
                    "resume=auto continues from this branch", config.resume, len(newer),
                    ", ".join(p.name for p in newer))
    return resume_from.parent.parent, resume_from


def refuse_a_resume_past_the_end(resume_from: Path, max_steps: int) -> None:
    step = checkpoint_step(resume_from)
    if step > max_steps:
        raise ConfigError(f"{str(resume_from)!r} is at step {step}, past stage.max_steps={max_steps}: there is "
                          f"nothing left to train; raise stage.max_steps to continue the run (at {step} it only "
                          f"validates and exports again)")


def _new_run_folder(run_dir: Path, named: bool) -> Path:
    """A new run's folder: `run_dir` unless another run's files are there; then, for a `named` run (run_name, or a
    launcher's job name every rank must agree on) an error, else the name with a fresh suffix."""
    if run_dir.exists() and any(path.is_file() for path in run_dir.rglob("*")):  # a failed start leaves no file
        if named:
            raise ConfigError(f"run folder {str(run_dir)!r} already holds {held_run(run_dir)}")
        run_dir = _suffixed(run_dir)
    return run_dir


def _suffixed(run_dir: Path) -> Path:
    """A new run's folder beside `run_dir`, whose name another run has: the name with a fresh suffix."""
    return run_dir.with_name(run_dir.name + f"-{time.time_ns() % 10**6:06d}")


def _claims_new_runs() -> bool:
    """Whether this process checks and claims a new run's folder: alone, or the first process of a launched job (the
    first node's rank 0: Lightning's own multi-node launch sets NODE_RANK, SLURM and torchrun a global rank)."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


def _claimed(run_dir: Path, named: bool) -> Path:
    """`run_dir`, claimed for this run; when another run claimed it first (started at the same moment), a `named`
    run's error, else the name with a fresh suffix."""
    base = run_dir
    while True:
        try:
            (run_dir / RUN_CLAIM).open("x").close()
            return run_dir
        except FileExistsError:
            if named:
                raise ConfigError(f"run folder {str(run_dir)!r} was taken by another run started at the same time; "
                                  f"choose another run_name") from None
            run_dir = _suffixed(base)
            run_dir.mkdir(parents=True, exist_ok=True)


def held_run(run_dir: Path) -> str:
    """What a run folder a new run may not take holds, and what to do instead."""
    checkpointed = any((run_dir / "checkpoints").glob("*.ckpt"))
    if not is_complete(run_dir / "export"):
        if not checkpointed:  # e.g. stopped by bad data before its first save
            return ("a run with no checkpoint yet: one still starting or training, or one that stopped before its "
                    "first checkpoint (its logs are there); pass resume=auto to start a stopped one again in this "
                    "folder, or choose another run_name")
        return "a run; pass resume=auto to continue it or choose another run_name"
    if checkpointed:
        return ("a finished run (its export is complete); pass resume=auto with a higher stage.max_steps to train it "
                "further, or choose another run_name")
    return ("a finished run (its export is complete) with no checkpoint to continue from; choose another run_name, or "
            "delete the folder to train it again")


@contextlib.contextmanager
def removed_if_left_empty(run_dir: Path) -> Iterator[None]:
    """On an error in the block, remove `run_dir` if it holds no file (a failed start), so run folders and
    resume=auto only ever see runs that wrote something. Rank 0 removes it: ranks fail together, and one rank's
    removal would pull the folder from under another's walk of it."""
    try:
        yield
    except BaseException:
        if rank_zero_only.rank != 0:
            raise
        if run_dir.is_dir() and not any(path.is_file() and path.name != RUN_CLAIM for path in run_dir.rglob("*")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _from_parent_rank() -> Run | None:
    """The run (folder, checkpoint, starting export) rank 0 chose, when this process is a rank Lightning launched
    from it."""
    launched = os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(PARENT_ENV) == str(os.getppid())
    if not launched or not os.environ.get(RUN_DIR_ENV):  # e.g. a plain child process of one that trained
        return None
    resume, init = os.environ.get(RESUME_ENV), os.environ.get(INIT_ENV)
    return Run(Path(os.environ[RUN_DIR_ENV]), Path(resume) if resume else None, Path(init) if init else None)


def _launch_name(named: bool) -> str | None:
    """A run name every rank of an externally launched job agrees on (srun, torchrun), or None for one process.

    Ranks started by SLURM or torchrun each pick their run folder themselves, so a timestamp could differ between
    them; the job id cannot. Other launchers of several ranks need an explicit run_name (`named`).
    """
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if elastic != "none":
        return f"torchrun-{elastic}"
    if not named and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"this is one of {os.environ['WORLD_SIZE']} ranks started by an external launcher; pass "
                          f"run_name=NAME so that every rank writes to the same run folder")
    return None


def _run_data(config: TrainConfig, resume_from: Path | None,
              read_data: Callable[[], DataSources] | None) -> tuple[DataSources | None, bool]:
    """The run's data, and whether it is the preference pairs recorded in the checkpoint it resumes from."""
    finds_pairs = config.data.train is None and get_stage(config.stage.name).data == "preferences"
    if resume_from and finds_pairs and (pairs := recorded_pairs(resume_from)):
        log.info("resume: continuing on the preference pairs this run started with, %s (the answers of %s)",
                 pairs.train, pairs.made_by)
        return pairs, True
    return (read_data() if read_data else None), False


def _start(config: TrainConfig, resume_from: Path | None, pairs_made_by: str | None) -> Path | None:
    """The export the model is built from: a resumed run's own (recorded in its checkpoint), else `init_from`'s. Pairs
    made by another model than that one are said to be so."""
    if resume_from is None:
        start = _init_source(config, pairs_made_by)
    elif start := recorded_start(resume_from):
        log.info("resume: the model is built from %s, the export this run started from, then takes the checkpoint's "
                 "weights", start)
    if not (pairs_made_by and start and Path(pairs_made_by).resolve() != start.resolve() and _is_chat_export(start)):
        return start
    if resume_from is None:
        log.warning("the preference pairs are the answers of %s, and this run starts from %s: they are not this "
                    "model's own answers (pass init_from=%s to train the model that gave them)", pairs_made_by, start,
                    pairs_made_by)
    else:  # the newest pairs, not recorded by a checkpoint older than that record: maybe a later constitution run's
        log.warning("the preference pairs this session reads are the answers of %s, and this run started from %s: "
                    "they are not the pairs its earlier steps trained on; pass data.train= (and data.val=) the pairs "
                    "it started with to continue on them", pairs_made_by, start)
    return start


def _is_chat_export(folder: Path) -> bool:
    """Whether `folder` holds a phase 2 export; what is not one is refused, by name, when the model is built."""
    try:
        return read_meta(folder).has_llm
    except ExportError:
        return False


def _init_source(config: TrainConfig, pairs_made_by: str | None) -> Path | None:
    if config.init_from is None:
        return None
    stage = get_stage(config.stage.name)
    previous = stage.previous
    if config.init_from != "auto":
        if previous is None:
            raise ConfigError(f"init_from={config.init_from!r}: stage={stage.name} starts from fresh weights, or "
                              f"pretrained timm/open_clip ones (model.vision.pretrained, model.text.pretrained); use "
                              f"resume=auto to continue a run")
        start = Path(config.init_from).expanduser()
        if not start.is_dir():
            raise ConfigError(f"init_from={config.init_from!r} is not a folder: give an export folder "
                              f"(OUTPUT_ROOT/STAGE/RUN/export), or init_from=auto for the newest {previous!r} one")
        log.info("init_from: starting from %s", config.init_from)
        return start
    if pairs_made_by:  # preference pairs: learn from the model whose own answers they are
        log.info("init_from=auto: starting from %s, whose answers the preference pairs are", pairs_made_by)
        return Path(pairs_made_by)
    if previous is None:
        return None
    found = latest_export(config.output_root, previous)
    if found is None and not stage.task.STARTS_FRESH:
        raise ConfigError(f"init_from=auto: no {previous!r} export under {config.output_root!r}, and stage="
                          f"{stage.name} starts from a trained model: run `python -m vlm.train stage={previous}` "
                          f"first, or pass init_from=PATH")
    if found is None:
        log.warning("init_from=auto: no %r export under %s, so this %s run starts from fresh weights; run "
                    "`python -m vlm.train stage=%s` first, or pass init_from=PATH", previous, config.output_root,
                    config.stage.name, previous)
    else:
        log.info("init_from=auto: starting from the latest %r export %s", previous, found)
    return found
