"""`StageTask`: the one LightningModule contract every stage follows.

The base owns what every stage does the same way: freezing by the stage table, AdamW with per-part learning rates and
a warmup-cosine schedule, gradient clipping (FSDP-aware), the bad-sample and non-finite-loss guards, and the export
hook that writes from a sharded run's gathered weights. A stage's task adds its model, its data decoding, its
training and validation steps, and its export format.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from vlm.config import TrainConfig, to_dict
from vlm.data.sources import DataSources
from vlm.training.freezing import (
    apply_freezing,
    keep_frozen_parts_in_eval,
    trainable_parts,
    warn_unread_stage_settings,
)
from vlm.training.gradients import clip_gradients
from vlm.training.health import DataHealth
from vlm.training.held_out import HeldOutShare
from vlm.training.optim import apply_stage_settings, build_optimizer, warmup_cosine


@dataclass
class Batching:
    """How a stage turns shard samples into batches: what the DataModule needs from its task."""

    decode: Callable[[dict], dict]  # a raw training sample -> model inputs (raises SkipSample for a bad one)
    val_decode: Callable[[dict], dict]  # a raw held-out sample -> model inputs and what validation scores
    collate: Callable[[list[dict]], dict[str, Any]]  # training samples -> a batch
    batch_size: int  # per device, training
    eval_batch_size: int
    val_collate: Callable[[list[dict]], dict[str, Any]] | None = None  # held-out samples -> a batch; None: `collate`
    length: Callable[[dict], int] | None = None  # a decoded sample's length, for data.length_group_batches


# eval.* settings a phase-2 run's held-out answers are scored with: `vlm.eval` takes them from the export's run unless
# given, as it does a stage's SCORED_WITH
EVAL_SCORED_WITH = ("turns", "max_new_tokens")


class StageTask(pl.LightningModule):
    """The base of every stage's LightningModule. `model.parts()` names the parts the stage table trains."""

    # stage.* settings the held-out scores depend on: `vlm.eval` takes them from the export's run unless given
    SCORED_WITH: tuple[str, ...] = ()
    # whether a run may start from fresh weights when init_from=auto finds no export of the stage before
    STARTS_FRESH = True
    # whether the stage trains an image-text embedding model (phase 1: zero-shot and retrieval scores, an export
    # without an LLM) rather than a chat model (phase 2: answers)
    EMBEDS = False
    READS_PREFERENCES = False  # whether it reads the preference settings (stage.beta, stage.loss, ...)

    def __init__(self, config: TrainConfig, stage: Stage, model: nn.Module):
        super().__init__()
        self.config = config
        self.stage = stage
        self.model = model
        self.trainable = trainable_parts(stage.trains, config.stage)
        parts = model.parts()
        warn_unread_stage_settings(config.stage, set(parts), self.READS_PREFERENCES)
        self.health = DataHealth(config.data.max_skip_rate, config.trainer.max_nonfinite_steps)
        self.parameter_counts = apply_freezing(parts, self.trainable, model.idle_parameters())
        # held-out samples a validation reads at most (None: all); a run's final validation reads all of them
        self.sample_limit: int | None = config.eval.max_samples
        # the last validation's rows for predictions.jsonl: phase 2's answers and their scores, contrastive's
        # zero-shot predictions and caption ranks
        self.predictions: list[dict[str, Any]] = []
        self.held_out: str | None = None  # the held-out data a training run validates on, recorded in its export
        self.held_out_share = HeldOutShare()  # the held-out batches this rank scores, set at each validation's start

    # ---- what each stage provides ----

    @classmethod
    def create(cls, config: TrainConfig, stage: Stage, init_from: Path | None, data: DataSources) -> StageTask:
        """The task for a training run, its model started from `init_from` (an export folder) or fresh."""
        raise NotImplementedError

    @classmethod
    def from_export(cls, config: TrainConfig, stage: Stage, directory: Path, data: DataSources) -> StageTask:
        """The task `vlm.eval` validates: the model of an export folder."""
        raise NotImplementedError

    def batching(self) -> Batching:
        raise NotImplementedError

    def val_batch_limit(self) -> int | None:
        """Enough held-out batches for `eval.max_samples` samples (None: all of them); the task scores the first
        `sample_limit` of what they hold, so a validation during training reads no more of the held-out set."""
        if self.sample_limit is None:
            return None
        return math.ceil(self.sample_limit / self.config.eval.batch_size)

    def prediction_metrics(self) -> dict[str, Any]:
        """Figures computed exactly from `predictions` (the logged ones went through float32); none by default."""
        return {}

    def empty_model(self) -> nn.Module:
        """A fresh unsharded model of the same shape, for a sharded run's gathered weights."""
        raise NotImplementedError

    def write_export(self, directory: Path, model: nn.Module) -> Path:
        raise NotImplementedError

    def export_settings(self) -> dict[str, Any]:
        """What the export records of its run (its train_config): the stage settings, its held-out data, how its
        answers were scored and the precision it ran in (`auto` made concrete), which `vlm.eval` scores with by
        default."""
        scoring = {key: getattr(self.config.eval, key) for key in EVAL_SCORED_WITH}
        return to_dict(self.config.stage) | {"held_out": self.held_out, "eval": scoring,
                                             "trainer": {"precision": self.config.trainer.precision}}

    # ---- shared by every stage ----

    def count_batch(self, samples: int) -> None:
        """Count a training batch's samples, and those this rank's readers skipped since the last batch, towards
        every rank's totals."""
        skips = getattr(getattr(self._trainer, "datamodule", None), "train_skips", None)  # None: no shard loader
        self.health.count_batch(samples, skips.take_new() if skips is not None else 0, self.sum_over_ranks)

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return values
        return self.trainer.strategy.reduce(values.to(self.device), reduce_op="sum").cpu()

    def guarded(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate; a non-finite one skips its step on every rank (see DataHealth.guard)."""
        return self.health.guard(loss, self.global_step, self)

    def train(self, mode: bool = True) -> StageTask:
        super().train(mode)
        if mode:
            keep_frozen_parts_in_eval(self.model.parts(), self.trainable)
        return self

    def on_train_start(self) -> None:
        # Lightning (>= 2.2) leaves each module in the mode it finds it and never calls train(). A model loaded from an
        # export is in eval mode: without this its trained parts would run so (no dropout, and Hugging Face layers skip
        # gradient checkpointing outside training mode), and a new model's frozen ViT would run in training mode (its
        # BatchNorm normalising by batch statistics and updating its running ones)
        self.train()
        if self.trainer.ckpt_path:  # resumed: the optimizer's settings came back from the checkpoint
            apply_stage_settings(self.optimizers().optimizer, self.lr_schedulers(), self.config.stage)

    def on_validation_epoch_start(self) -> None:
        self.held_out_share = HeldOutShare.of(self._trainer)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.health.drop_skipped_gradients(optimizer)

    def lr_scheduler_step(self, scheduler: torch.optim.lr_scheduler.LRScheduler, metric: Any = None) -> None:
        # a skipped step leaves the schedule where AdamW's step counts are: the run's next real update takes the rate
        # this one would have taken
        if not self.health.update_skipped:
            scheduler.step()

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model.parts(), self.config.stage)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": warmup_cosine(optimizer, self.config.stage), "interval": "step"}}

    def export(self, directory: Path, gathered: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the export folder from this model, or from `gathered` weights (a sharded run's full state dict,
        whose `model.*` keys are this task's model): FSDP leaves no rank holding whole weights."""
        model = self.model
        if gathered is not None:
            model = self.empty_model()
            model.load_state_dict({k.removeprefix("model."): v for k, v in gathered.items()
                                   if k.startswith("model.")}, strict=True)
            model.eval()
        return self.write_export(directory, model)


@dataclass(frozen=True)
class Stage:
    """A row of the stage table (vlm/training/stages.py)."""

    name: str
    task: type[StageTask]  # the LightningModule that trains it and that `vlm.eval` validates its exports with
    trains: frozenset[str]  # model parts with requires_grad=True; every other part is frozen
    data: str  # "captions" (image + txt), "conversations" (images + LLaVA-style json) or "preferences" (pairs)
    previous: str | None  # the stage whose latest export this one starts from by default
