"""`python -m vlm.train stage=contrastive|align|sft [key=value ...]`: train one stage.

compose the config -> pick the run folder -> build the stage's model and data -> fit -> export + metrics.json
"""

from __future__ import annotations

import logging
import sys
import time

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig

from vlm.cli import CONFIG_DIR, fail, preflight, user_errors
from vlm.config import to_train_config
from vlm.data.shards import ShardError
from vlm.data.sources import resolve as resolve_data
from vlm.lit.build import build_task, build_trainer, finish
from vlm.lit.common import NonFiniteLoss, TooManyBadSamples
from vlm.lit.sharding import check_strategy
from vlm.runs import prepare_run
from vlm.stages import get_stage

log = logging.getLogger("vlm.train")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def train(cfg: DictConfig) -> dict:
    started = time.time()
    with user_errors():
        config = to_train_config(cfg)
        check_strategy(config.trainer)  # a Lightning name, and FSDP settings these devices can run
        pl.seed_everything(config.trainer.seed, workers=True, verbose=False)
        data = resolve_data(config.data, get_stage(config.stage.name).data)
        run = prepare_run(config)
        log.info("stage %s -> %s", config.stage.name, run.dir)
        task, datamodule = build_task(config, run, data)
        trainer = build_trainer(config, run, task.model)
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=run.resume_from)
    except (TooManyBadSamples, NonFiniteLoss, ShardError) as err:  # the run's verdict on its data: one clear line
        fail(str(err))
    with user_errors():
        return finish(trainer, task, datamodule, run, config, started)


def main() -> None:
    preflight(sys.argv[1:], "train")
    train()


if __name__ == "__main__":
    main()
