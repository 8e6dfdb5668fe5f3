"""`python -m vlm.eval stage=contrastive|align|sft checkpoint=EXPORT [data.val=SHARDS]` (or `vlm-eval`): score an
export folder on held-out data.

contrastive: zero-shot top-1 (when the held-out samples carry labels) and image<->text retrieval R@1.
align / sft: held-out loss, and exact-match answer accuracy by question type for conversations.
Without data.val it scores the synthetic held-out split. Prints the metrics as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig

from vlm.cli import CONFIG_DIR, preflight, user_errors
from vlm.config import ConfigError, TrainConfig, to_train_config
from vlm.data.sources import resolve_eval
from vlm.training.datamodule import ShardDataModule
from vlm.training.stages import get_stage


def evaluate(config: TrainConfig) -> dict[str, Any]:
    """Validate the export `config.checkpoint` with its stage's task; returns the metrics."""
    if not config.checkpoint:
        raise ConfigError("checkpoint=PATH is required: the export folder of a run (OUTPUT_ROOT/STAGE/RUN/export)")
    stage = get_stage(config.stage.name)
    data = resolve_eval(config.data, stage.data)
    task = stage.task.from_export(config, stage, Path(config.checkpoint).expanduser(), data)
    datamodule = ShardDataModule(data, task.batching(), config.data)
    trainer = pl.Trainer(accelerator=config.trainer.accelerator, devices=1, precision=config.trainer.precision,
                         logger=False, enable_checkpointing=False, enable_model_summary=False)
    results = trainer.validate(task, datamodule=datamodule, verbose=False)
    metrics: dict[str, Any] = {k.removeprefix("val/"): round(float(v), 4)
                               for k, v in (results[0] if results else {}).items()}
    metrics.update(checkpoint=str(Path(config.checkpoint).resolve()), data=data.val)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main_hydra(cfg: DictConfig) -> dict[str, Any]:
    with user_errors():
        metrics = evaluate(to_train_config(cfg))
    print(json.dumps(metrics, indent=2))
    return metrics


def main() -> None:
    preflight(sys.argv[1:], "train")
    main_hydra()


if __name__ == "__main__":
    main()
