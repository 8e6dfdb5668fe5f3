"""The Lightning Trainer of a stage, and the end of a run: final validation, the export folder and metrics.json."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vlm.config import ConfigError, TrainConfig, to_dict
from vlm.errors import first_line
from vlm.models.blocks import compile_blocks
from vlm.signals import signal_noted
from vlm.training.callbacks import progress_callback
from vlm.training.checkpoint_io import AtomicCheckpointIO
from vlm.training.data_position import DataPosition
from vlm.training.datamodule import ShardDataModule
from vlm.training.health import EmptyPassGuard
from vlm.training.loggers import build_logger
from vlm.training.random_state import RandomState
from vlm.training.resume import NewestCheckpoints, RunRecord, checkpoint_step
from vlm.training.runs import Run
from vlm.training.strategy import build_strategy, configure_precision
from vlm.training.task import StageTask

log = logging.getLogger(__name__)


def build_trainer(config: TrainConfig, run: Run, task: StageTask, started: float) -> pl.Trainer:
    """The Trainer for a stage, whose process started the run at `started` (time.time()). FSDP shards the task
    model's transformer blocks one by one; `trainer.compile` compiles them in place."""
    t = config.trainer
    if t.compile:
        log.info("trainer.compile: %d transformer blocks compile on their first batch", compile_blocks(task.model))
    # save_on_train_epoch_end: without it, a save due on an epoch's last batch waits for a validation that our
    # step-based schedule does not run there, and that checkpoint is never written
    checkpoints = NewestCheckpoints(dirpath=run.checkpoints, filename="step{step:08d}", auto_insert_metric_name=False,
                                   every_n_train_steps=t.checkpoint_every_n_steps, monitor="step", mode="max",
                                   save_top_k=3, save_last=False, save_on_train_epoch_end=True)
    resume_step = checkpoint_step(run.resume_from) if run.resume_from else None
    with trainer_settings_checked(t):
        return _trainer(config, run, task, checkpoints, resume_step, started)


@contextlib.contextmanager
def trainer_settings_checked(t: Any) -> Iterator[None]:
    """Lightning's checks of the `trainer` settings (no GPU for accelerator=gpu, an unknown precision, ...) as one
    ConfigError naming them; ours, which name their key, pass as they are."""
    try:
        yield
    except ConfigError:
        raise
    except (MisconfigurationException, TypeError, ValueError) as err:
        raise ConfigError(f"trainer settings (accelerator={t.accelerator}, devices={t.devices}, strategy="
                          f"{t.strategy}, precision={t.precision}): {first_line(err)}") from None


def _trainer(config: TrainConfig, run: Run, task: StageTask, checkpoints: NewestCheckpoints,
             resume_step: int | None, started: float) -> pl.Trainer:
    t = config.trainer
    return pl.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                      strategy=build_strategy(t, task.model),
                      precision=t.precision, max_steps=config.stage.max_steps, max_epochs=-1,
                      val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
                      log_every_n_steps=t.log_every_n_steps, gradient_clip_val=t.gradient_clip_val,
                      callbacks=[checkpoints, DataPosition(started), RandomState(), RunRecord(run.init_from, run.data),
                                 progress_callback(), EmptyPassGuard(), LearningRateMonitor(logging_interval="step")],
                      # whole or absent, fsynced, written straight to disk (Lightning's own save first builds
                      # the whole checkpoint in a memory buffer: the optimizer state of a large model twice)
                      plugins=[AtomicCheckpointIO()],
                      # BatchNorm (the conv stem) sees the global batch on several GPUs, as the contrastive loss does;
                      # torch's SyncBatchNorm runs on GPUs only, so CPU ranks keep their own statistics
                      sync_batchnorm=t.accelerator != "cpu" and torch.cuda.is_available(),
                      logger=build_logger(t.logger, run.dir, resume_step), default_root_dir=run.dir,
                      num_sanity_val_steps=0, enable_model_summary=False, use_distributed_sampler=False,
                      limit_val_batches=task.val_batch_limit())


def build_eval_trainer(config: TrainConfig, task: StageTask) -> pl.Trainer:
    """The Trainer `vlm.eval` validates an export with: one device, the run's precision, no logger or checkpoints,
    reading the first eval.max_samples held-out samples (all when null)."""
    with trainer_settings_checked(config.trainer):
        return pl.Trainer(accelerator=config.trainer.accelerator, devices=1,
                          precision=configure_precision(config.trainer), logger=False, enable_checkpointing=False,
                          enable_model_summary=False, callbacks=[progress_callback()],
                          limit_val_batches=task.val_batch_limit())


def validate(trainer: pl.Trainer, task: StageTask, datamodule: ShardDataModule) -> dict[str, float]:
    """One validation pass: the logged metrics, with the answer scores computed exactly from the answers (the logged
    ones went through float32), and the counts (`*_scored`) as integers."""
    with weights_as_given(trainer):
        results = trainer.validate(task, datamodule=datamodule, verbose=False)
    metrics = {k.removeprefix("val/"): int(v) if k.endswith("_scored") else float(v)
               for k, v in (results[0] if results else {}).items()}
    return metrics | task.prediction_metrics()


@contextlib.contextmanager
def weights_as_given(trainer: pl.Trainer) -> Iterator[None]:
    """Validate the model given, as it is. Under SLURM, Lightning's `validate(model)` without a checkpoint path loads
    the newest SLURM requeue checkpoint of its default_root_dir (`hpc_ckpt_*.ckpt`, written on SIGUSR1, possibly
    thousands of steps old) over the weights just trained, and the final figures and the export would be that
    checkpoint's. Lightning has no switch for it: its checkpoint connector's path choice is bypassed for the call."""
    connector = trainer._checkpoint_connector
    connector._parse_ckpt_path = lambda state_fn, ckpt_path, model_provided, model_connected: ckpt_path
    try:
        yield
    finally:
        del connector._parse_ckpt_path  # the class's own again


class NothingToScore(ConfigError):
    """Held-out data with no sample that can be scored."""


def check_scored(task: StageTask, metrics: dict[str, Any], pattern: str | None) -> None:
    """An empty held-out set, or one whose every sample was skipped, is an error rather than a score of 0 or NaN."""
    if not metrics or ("loss" in metrics and not task.predictions and "rewards/accuracy" not in metrics):
        raise NothingToScore(f"no held-out sample of data.val={pattern!r} could be scored: the shards hold none, or "
                             f"every one was skipped (the warnings above name each skipped sample with its shard and "
                             f"the reason, e.g. no assistant turn)")
    if task.READS_PREFERENCES and "rewards/accuracy" not in metrics:  # the answers were scored, no pair was
        log.warning("data.val=%r holds no preference pair that could be scored, so rewards/* are not measured, only "
                    "the answers of its conversations; give held-out pairs (a vlm.constitution output's val/ shards, "
                    "mixed in with ::)", pattern)


def finish(trainer: pl.Trainer, task: StageTask, datamodule: ShardDataModule, run: Run,
           config: TrainConfig) -> dict[str, Any]:
    """Final validation, the export folder and metrics.json; returns the metrics. Wall time and sample counts are
    the whole run's, over every session of a resumed one. A SIGTERM before the export stops the run (143) rather than
    killing it unannounced or letting it end as finished."""
    with signal_noted(signal.SIGTERM) as noted:
        # first, even after a SIGTERM between the last step and the end of fit: resume=auto then has every step trained
        save_final_checkpoint(trainer, run, config)
        if trainer.received_sigterm or noted.received:  # before fit ended, or while the checkpoint was written
            raise SIGTERMException
        metrics: dict[str, Any] = {}
        if datamodule.val_urls:
            task.sample_limit = None  # the final figures read the whole held-out set, as vlm.eval does
            trainer.limit_val_batches = task.val_batch_limit() or 1.0
            metrics.update(validate(trainer, task, datamodule))
            # a validation goes on through SIGTERM; the export must not be written as if the run finished (vlm.train
            # says where resume=auto goes on)
            if trainer.received_sigterm or noted.received:
                raise SIGTERMException
            try:
                check_scored(task, metrics, config.data.val or datamodule.val_urls[0])
            except NothingToScore as err:  # the model trained and is exported; its figures are what is missing
                log.warning("%s; metrics.json holds counts only", err)
    metrics.update({"stage": config.stage.name, "global_step": trainer.global_step,
                    "wall_seconds": round(run_seconds(trainer), 1), "samples_skipped": task.health.total_skipped,
                    "samples_seen": task.health.total_seen, "export": str(run.export.absolute())})
    # FSDP leaves each rank a shard: gather the full weights (a collective every rank joins), export them on rank 0
    gathered = trainer.strategy.lightning_module_state_dict() if isinstance(trainer.strategy, FSDPStrategy) else None
    if trainer.is_global_zero:
        # the export last: a complete one marks the run finished (resume=auto), so what it records comes first
        (run.dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (run.dir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
        task.export(run.export, gathered)
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        log.info("done: %s", json.dumps(shown, ensure_ascii=False))  # a folder "rün 1" as typed, not "r\u00fcn 1"
        log.info("export folder: %s", Path(run.export).resolve())
    leave_process_group()
    return metrics


def save_final_checkpoint(trainer: pl.Trainer, run: Run, config: TrainConfig) -> None:
    """A checkpoint at the last step of a run that wrote periodic ones (this session or, resumed, an earlier one) but
    missed it: resume=auto then knows the run finished, and a run given more steps goes on from there instead of
    training its last steps again. Every rank takes the same decision (from the settings, not from files another node
    may not see), as saving is collective."""
    every = config.trainer.checkpoint_every_n_steps
    wrote_periodic = trainer.global_step > every or run.resume_from is not None  # a resumed run: in an earlier session
    if wrote_periodic and trainer.global_step % every:
        # weights_only=False: the whole state (optimizer, schedule, data position) that resume=auto restores
        trainer.save_checkpoint(run.checkpoints / f"step{trainer.global_step:08d}.ckpt", weights_only=False)
        trainer.checkpoint_callback.keep_newest(trainer)


def run_seconds(trainer: pl.Trainer) -> float:
    return next(c for c in trainer.callbacks if isinstance(c, DataPosition)).run_seconds()


def leave_process_group() -> None:
    """Every rank waits for the others (rank 0 may still be writing the export), then all leave the process group.
    A rank that exits with the group still open can abort at interpreter shutdown (gloo: "terminate called without an
    active exception"), and a cluster scheduler would then mark the whole job failed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
