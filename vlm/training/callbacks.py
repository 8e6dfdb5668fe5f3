"""Progress: a bar that counts optimizer steps towards `stage.max_steps` across epochs on a terminal, and a plain
line every few percent when stderr goes to a file (SLURM logs, CI, `> run.log`), where a bar's carriage-return
redraws would pile up into megabytes; there, a validation that runs long (a final one over every held-out answer,
`vlm.eval`) gets a line every few seconds too."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

PLAIN_LINES_PER_RUN = 20  # a plain progress line every 5% of the run
VALIDATION_LINE_SECONDS = 15.0  # a long validation's plain progress line at most this often


def progress_callback() -> ProgressBar:
    """The step bar on a terminal, plain lines otherwise."""
    return StepProgressBar() if sys.stderr.isatty() else PlainProgress()


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run (steps / max_steps), not one per pass over the shards."""

    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description(f"train {pl_stage(trainer)}")

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # keep the run-long bar

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.train_progress_bar is not None and not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a run stopped by an error (too much bad data, non-finite losses) closes its bars, as a finished run does;
        # an open bar would keep redrawing itself above whatever the process prints next
        for name in ("_train_progress_bar", "_val_progress_bar"):
            bar = getattr(self, name, None)
            if bar is not None:
                bar.close()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def pl_stage(trainer: pl.Trainer) -> str:
    """The vlm stage being trained, for the bar's label."""
    config = getattr(trainer.lightning_module, "config", None)
    return config.stage.name if config is not None else ""


class PlainProgress(ProgressBar):
    """One line per 5% of the run: step, percentage, steps per second, time left, and the logged losses."""

    def __init__(self, validation_line_seconds: float = VALIDATION_LINE_SECONDS) -> None:
        super().__init__()
        self._enabled = True
        self._started: float | None = None
        self._first_step = 0
        self._validation_line_seconds = validation_line_seconds
        self._validation_started = self._last_line = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = None  # set by the first batch: work done before it (dpo's reference pass) is not a step

    def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if self._started is None:
            self._started, self._first_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        step, total = trainer.global_step, trainer.max_steps
        every = max(1, total // PLAIN_LINES_PER_RUN)
        if not self._enabled or not trainer.is_global_zero or (step % every and step != total):
            return
        rate = (step - self._first_step) / max(time.monotonic() - (self._started or 0.0), 1e-9)
        left = (total - step) / rate if rate > 0 else float("inf")
        metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num")
        print(f"train {pl_stage(trainer)}: step {step}/{total} ({step / total:.0%}), {rate:.2f} steps/s, "
              f"{left:.0f} s left {metrics}".rstrip(), file=sys.stderr, flush=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_started = self._last_line = time.monotonic()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        now = time.monotonic()
        if (not self._enabled or trainer.sanity_checking or not trainer.is_global_zero
                or now - self._last_line < self._validation_line_seconds):
            return
        self._last_line = now
        total = trainer.num_val_batches[dataloader_idx]  # inf for shards of unknown length and no eval.max_samples
        of = f"/{int(total)} ({(batch_idx + 1) / total:.0%})" if total != float("inf") else ""
        label = f"validate {pl_stage(trainer)}".rstrip()
        elapsed = now - self._validation_started
        print(f"{label}: batch {batch_idx + 1}{of}, {elapsed:.0f} s", file=sys.stderr, flush=True)
