"""Builds what a stage needs: its LightningModule and DataModule (from the stage table), the Trainer, and the
final export and metrics."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from vlm.config import TrainConfig, to_dict
from vlm.data import sources
from vlm.lit.callbacks import StepProgressBar
from vlm.lit.checkpointing import AtomicCheckpointIO, ContinuingCSVLogger, DataPosition, checkpoint_step
from vlm.lit.common import DataHealth
from vlm.lit.data import ShardDataModule
from vlm.lit.sharding import build_strategy
from vlm.models.blocks import compile_blocks
from vlm.runs import Run
from vlm.stages import get_stage

log = logging.getLogger(__name__)


def build_task(config: TrainConfig, run: Run, data: sources.DataSources) -> tuple[pl.LightningModule, ShardDataModule]:
    stage = get_stage(config.stage.name)
    if stage.name == "contrastive":
        from vlm.lit.contrastive import ContrastiveTask

        task = ContrastiveTask.create(config, data.classnames, init_from=run.init_from)
    else:
        from vlm.lit.vlm_task import VLMTask

        task = VLMTask.create(config, init_from=run.init_from)
    if config.trainer.compile:
        log.info("trainer.compile: %d transformer blocks compile on their first batch", compile_blocks(task.model))
    datamodule = ShardDataModule(data.train, data.val, task.decoder(stage.data), task.collate,
                                 config.stage.batch_size, config.eval.batch_size, config.data, config.trainer.seed,
                                 val_decode=task.decoder(stage.data, evaluate=True))
    return task, datamodule


def build_trainer(config: TrainConfig, run: Run, model: nn.Module) -> pl.Trainer:
    """The Trainer for a stage; `model` is the task's model, whose transformer blocks FSDP shards one by one."""
    t = config.trainer
    # save_on_train_epoch_end: without it, a save due on an epoch's last batch waits for a validation that our
    # step-based schedule does not run there, and that checkpoint is never written
    checkpoints = ModelCheckpoint(dirpath=run.checkpoints, filename="step{step:08d}", auto_insert_metric_name=False,
                                  every_n_train_steps=t.checkpoint_every_n_steps, monitor="step", mode="max",
                                  save_top_k=3, save_last=False, save_on_train_epoch_end=True)
    if t.logger == "tensorboard":
        logger: Any = TensorBoardLogger(run.dir, name="logs", version="")
    else:  # a resumed run's metrics.csv carries on from the checkpoint's step
        logger = ContinuingCSVLogger(run.dir, name="logs", version="",
                                     resume_step=checkpoint_step(run.resume_from) if run.resume_from else None)
    return pl.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                      strategy=build_strategy(t, model),
                      precision=t.precision, max_steps=config.stage.max_steps, max_epochs=-1,
                      val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
                      log_every_n_steps=t.log_every_n_steps, gradient_clip_val=t.gradient_clip_val,
                      callbacks=[checkpoints, DataPosition(), StepProgressBar(),
                                 LearningRateMonitor(logging_interval="step")],
                      plugins=[AtomicCheckpointIO()],  # a checkpoint is whole or absent, never truncated
                      # BatchNorm (the conv stem) sees the global batch on several GPUs, as the contrastive loss does;
                      # torch's SyncBatchNorm runs on GPUs only, so CPU ranks keep their own statistics
                      sync_batchnorm=t.accelerator != "cpu" and torch.cuda.is_available(),
                      logger=logger, default_root_dir=run.dir, num_sanity_val_steps=0, enable_model_summary=False,
                      use_distributed_sampler=False, limit_val_batches=None)


def global_sample_counts(trainer: pl.Trainer, health: DataHealth) -> tuple[int, int]:
    """Samples seen and skipped, summed over every rank (each rank reads its own shards). Every rank must call it."""
    counts = torch.tensor([health.seen, health.skipped], dtype=torch.float64, device=trainer.strategy.root_device)
    if trainer.world_size > 1:
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
    return int(counts[0]), int(counts[1])


def finish(trainer: pl.Trainer, task: pl.LightningModule, datamodule: ShardDataModule, run: Run,
           config: TrainConfig, started: float) -> dict[str, Any]:
    """Final validation, the export folder and metrics.json; returns the metrics."""
    metrics: dict[str, Any] = {}
    if datamodule.val_urls:
        results = trainer.validate(task, datamodule=datamodule, verbose=False)
        metrics.update({k.removeprefix("val/"): float(v) for k, v in (results[0] if results else {}).items()})
    seen, skipped = global_sample_counts(trainer, task.health)
    metrics.update({"stage": config.stage.name, "global_step": trainer.global_step,
                    "wall_seconds": round(time.time() - started, 1), "samples_skipped": skipped,
                    "samples_seen": seen, "export": str(run.export)})
    # FSDP leaves each rank a shard: gather the full weights (a collective every rank joins), export them on rank 0
    gathered = trainer.strategy.lightning_module_state_dict() if isinstance(trainer.strategy, FSDPStrategy) else None
    if trainer.is_global_zero:
        task.export(run.export, gathered)
        (run.dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (run.dir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        log.info("done: %s", json.dumps(shown))
        log.info("export folder: %s", Path(run.export).resolve())
    leave_process_group()
    return metrics


def leave_process_group() -> None:
    """Every rank waits for the others (rank 0 may still be writing the export), then all leave the process group.
    A rank that exits with the group still open can abort at interpreter shutdown (gloo: "terminate called without an
    active exception"), and a cluster scheduler would then mark the whole job failed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
