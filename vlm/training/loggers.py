"""Metric loggers: a CSV log that carries on across `resume=auto` restarts, or TensorBoard."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from vlm.config import ConfigError


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts. On resume, keep the rows logged before
    the checkpoint's step instead (the training rows from it on belong to steps the resumed run trains again)."""

    def __init__(self, log_dir: str, resume_step: int):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _before_resume(self, row: dict[str, str]) -> bool:
        """Rows of steps before the checkpoint's, and the validation rows at its step (a run's last validation is
        logged at the step it saved, and the resumed run does not repeat it)."""
        step = int(float(row["step"]))
        filled = [key for key, value in row.items() if value not in ("", None) and key not in ("step", "epoch")]
        return step < self.resume_step or (step == self.resume_step and bool(filled)
                                           and all(key.startswith("val/") for key in filled))

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") and self._before_resume(row)]
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


def check_logger(kind: str) -> None:
    """`trainer.logger` can run here: checked when a run starts, before any model is built."""
    if kind == "tensorboard" and importlib.util.find_spec("tensorboard") is None \
            and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError("trainer.logger=tensorboard needs the tensorboard package: pip install 'vlm[tensorboard]' "
                          "(in a checkout: pip install -e '.[tensorboard]'), or use trainer.logger=csv")


def build_logger(kind: str, run_dir: Path, resume_step: int | None) -> Logger:
    """`trainer.logger`: csv (logs/metrics.csv, continued from `resume_step` on resume) or tensorboard."""
    if kind == "tensorboard":
        check_logger(kind)
        return TensorBoardLogger(run_dir, name="logs", version="")
    return ContinuingCSVLogger(run_dir, name="logs", version="", resume_step=resume_step)
