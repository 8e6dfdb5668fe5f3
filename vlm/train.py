"""`python -m vlm.train stage=contrastive|align|sft|dpo [key=value ...]` (or `vlm-train`): train one stage.

compose the config -> pick the run folder -> the stage's task and data -> fit -> export + metrics.json
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from vlm.cli import CONFIG_DIR, preflight, quiet, user_errors
from vlm.config import ConfigError, TrainConfig, to_train_config
from vlm.data.shards import absolute_pattern
from vlm.data.sources import resolve as resolve_data
from vlm.errors import first_line
from vlm.training.datamodule import ShardDataModule
from vlm.training.loggers import check_logger
from vlm.training.resume import refuse_unfitting_weights, warn_changed_settings
from vlm.training.runs import Run, prepare_run, removed_if_left_empty
from vlm.training.stages import get_stage
from vlm.training.strategy import check_strategy, configure_precision
from vlm.training.trainer import build_trainer, finish

log = logging.getLogger("vlm.train")


def run(config: TrainConfig, callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Train the stage `config.stage.name` and write its export; returns the final metrics. `callbacks` join the
    Trainer's own (tests and benchmarks watch or perturb a run through them)."""
    started = time.time()
    if config.checkpoint is not None:  # vlm.eval's key, in the config both read
        raise ConfigError(f"checkpoint={config.checkpoint!r} is what vlm.eval scores; a training run starts from an "
                          f"export with init_from=PATH (and continues a run with resume=)")
    with start_up_told_once():
        check_strategy(config.trainer)  # a Lightning name, and FSDP settings these devices can run
        check_logger(config.trainer.logger)
        config.trainer.precision = configure_precision(config.trainer)  # "auto" -> what runs here; saved with the run
        pl.seed_everything(config.trainer.seed, workers=True, verbose=False)
        stage = get_stage(config.stage.name)
        run_folder = prepare_run(config, lambda: resolve_data(config.data, stage.data, config.output_root))
        data = run_folder.data
        if run_folder.resume_from:
            warn_changed_settings(run_folder.resume_from, config, stage.trains)
        log.info("stage %s -> %s", stage.name, run_folder.dir)
    with removed_if_left_empty(run_folder.dir):  # a start that fails leaves no empty run folder behind
        with start_up_told_once():
            task = stage.task.create(config, stage, run_folder.init_from, data)
            task.held_out = absolute_pattern(data.val) if data.val else None  # recorded in the export for vlm.eval
            if run_folder.resume_from and run_folder.init_from is None:  # built from model.*: as the run was?
                refuse_unfitting_weights(run_folder.resume_from, task)
            datamodule = ShardDataModule(data, task.batching(), config.data, config.trainer.seed)
            if datamodule.val_urls and task.val_batch_limit() is not None:
                log.info("validations during training read the first %d held-out samples (eval.max_samples); the "
                         "last one reads all", task.sample_limit)
            trainer = build_trainer(config, run_folder, task, started)
        trainer.callbacks.extend(callbacks)
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=run_folder.resume_from)
            return finish(trainer, task, datamodule, run_folder, config)  # the final validation, the export
        except SIGTERMException:  # Lightning's, a SystemExit of code 0: a killed job must not read as a finished one
            stopped(trainer, run_folder, "SIGTERM", 143)
        except RuntimeError as error:
            if trainer.world_size == 1 or not peer_rank_gone(error):
                raise
            # its own error (a bad shard only it read) says why; a collective's traceback here would bury it
            log.error("rank %d stops: another rank ended the run (%s); its error above says why", trainer.global_rank,
                      first_line(error)[:160])
            raise SystemExit(1) from None
        except SystemExit as stop:  # Lightning ends a Ctrl-C with exit code 1, after its own shutdown
            if stop.code != 1 or not trainer.interrupted:
                raise
            stopped(trainer, run_folder, "Ctrl-C", 130)


def peer_rank_gone(error: RuntimeError) -> bool:
    """Whether a collective failed because another rank's process ended (gloo and NCCL word it so)."""
    text = str(error)
    return isinstance(error, torch.distributed.DistBackendError) or any(
        cause in text for cause in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def stopped(trainer: pl.Trainer, run_folder: Run, by: str, code: int) -> NoReturn:
    """End a run stopped by a signal with 128 + the signal's number, as a shell reports a process it ended (a job
    that did not finish must not read as one that did), saying where it can go on from."""
    written = any(run_folder.checkpoints.glob("*.ckpt"))
    where = (f"resume=auto continues from the newest checkpoint in {run_folder.checkpoints}" if written else
             "no checkpoint was written yet, so resume=auto starts it again from step 0")
    log.error("stopped by %s at step %d, before the export; %s", by, trainer.global_step, where)
    raise SystemExit(code) from None


def start_up_told_once() -> contextlib.AbstractContextManager:
    """Lightning starts ranks 1, 2, ... of a machine by running the command again: they keep their warnings, and
    leave the start-up's account (data, run folder, parameter counts) to rank 0."""
    return quiet("vlm") if rank_zero_only.rank != 0 else contextlib.nullcontext()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def train(cfg: DictConfig) -> dict[str, Any]:
    with user_errors():  # a bad config or bad data: one clear line, exit code 2
        return run(to_train_config(cfg))


def main() -> None:
    preflight(sys.argv[1:], "train")
    train()


if __name__ == "__main__":
    main()
