"""Callbacks: a progress bar that counts optimizer steps towards `stage.max_steps` across epochs."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


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
