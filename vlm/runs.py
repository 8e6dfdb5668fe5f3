"""Run folders: where a run writes, which checkpoint `resume=auto` continues and which export a stage starts from.

Layout: OUTPUT_ROOT/STAGE/RUN_NAME/{checkpoints/, export/, logs/, metrics.json}.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from vlm.config import ConfigError, TrainConfig
from vlm.export import CONFIG_FILE, WEIGHTS_FILE
from vlm.stages import get_stage

log = logging.getLogger(__name__)


@dataclass
class Run:
    dir: Path
    resume_from: Path | None  # Lightning checkpoint to continue from
    init_from: Path | None  # export folder whose weights start this stage

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def export(self) -> Path:
        return self.dir / "export"


def _runs(stage_dir: Path) -> list[Path]:
    return sorted((p for p in stage_dir.glob("*") if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime)


def latest_export(output_root: str | Path, stage: str) -> Path | None:
    """The newest complete export folder of a stage, or None."""
    exports = [run / "export" for run in _runs(Path(output_root) / stage)
               if (run / "export" / CONFIG_FILE).is_file() and (run / "export" / WEIGHTS_FILE).is_file()]
    return exports[-1] if exports else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run (validity is checked by the resume logic, which falls back)."""
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return ckpts[-1] if ckpts else None


def prepare_run(config: TrainConfig) -> Run:
    stage_dir = Path(config.output_root).expanduser() / config.stage.name
    resume_from = None
    if config.resume == "auto":
        if config.run_name:
            run_dir = stage_dir / config.run_name
        else:
            runs = [r for r in _runs(stage_dir) if (r / "checkpoints").is_dir()]
            run_dir = runs[-1] if runs else stage_dir / time.strftime("%Y%m%d-%H%M%S")
        resume_from = latest_checkpoint(run_dir) if run_dir.exists() else None
        log.info("resume=auto: %s %s", "continuing" if resume_from else "no checkpoint yet, starting", run_dir)
    elif config.resume:
        resume_from = Path(config.resume).expanduser()
        if not resume_from.is_file():
            raise ConfigError(f"resume={config.resume!r}: no such checkpoint file")
        run_dir = resume_from.parent.parent
    else:
        run_dir = stage_dir / (config.run_name or time.strftime("%Y%m%d-%H%M%S"))
        if run_dir.exists() and any(run_dir.iterdir()):
            if config.run_name:
                raise ConfigError(f"run folder {str(run_dir)!r} already holds a run; pass resume=auto to continue it "
                                  f"or choose another run_name")
            run_dir = run_dir.with_name(run_dir.name + f"-{time.time_ns() % 10**6:06d}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return Run(run_dir, resume_from, None if resume_from else _init_source(config))


def _init_source(config: TrainConfig) -> Path | None:
    if config.init_from is None:
        return None
    if config.init_from != "auto":
        return Path(config.init_from).expanduser()
    previous = get_stage(config.stage.name).previous
    if previous is None:
        return None
    found = latest_export(config.output_root, previous)
    if found is None:
        log.warning("init_from=auto: no %r export under %s, so this %s run starts from fresh weights; run "
                    "`python -m vlm.train stage=%s` first, or pass init_from=PATH", previous, config.output_root,
                    config.stage.name, previous)
    else:
        log.info("init_from=auto: starting from the latest %r export %s", previous, found)
    return found
