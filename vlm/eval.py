"""`python -m vlm.eval stage=contrastive|align|sft checkpoint=EXPORT [data.val=SHARDS]`: score an export folder.

contrastive: zero-shot top-1 (when the held-out samples carry labels) and image<->text retrieval R@1.
align / sft: held-out loss, and exact-match answer accuracy by question type for conversations.
Without data.val it scores the synthetic held-out split. Prints the metrics and writes them as JSON.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig

from vlm.cli import CONFIG_DIR, fail, preflight, user_errors
from vlm.config import to_train_config
from vlm.data.sources import resolve_eval
from vlm.lit.data import ShardDataModule
from vlm.stages import get_stage

log = logging.getLogger("vlm.eval")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def evaluate(cfg: DictConfig) -> dict:
    with user_errors():
        config = to_train_config(cfg)
        if not config.checkpoint:
            fail("checkpoint=PATH is required: the export folder of a run (OUTPUT_ROOT/STAGE/RUN/export)")
        stage = get_stage(config.stage.name)
        data = resolve_eval(config.data, stage.data)
        if stage.name == "contrastive":
            from vlm.lit.contrastive import ContrastiveTask
            from vlm.loading import load_clip

            clip = load_clip(config.checkpoint)
            config.eval.templates = config.eval.templates or clip.templates
            task = ContrastiveTask(config, clip.tokenizer, data.classnames or clip.classnames, model=clip.model)
        else:
            from vlm.lit.vlm_task import VLMTask
            from vlm.loading import load_vlm

            task = VLMTask(config, load_vlm(config.checkpoint, tiler=config.tiler))
        datamodule = ShardDataModule(None, data.val, task.decoder(stage.data), task.collate, 1,
                                     config.eval.batch_size, config.data, val_decode=task.decoder(stage.data, True))
    trainer = pl.Trainer(accelerator=config.trainer.accelerator, devices=1, precision=config.trainer.precision,
                         logger=False, enable_checkpointing=False, enable_model_summary=False)
    results = trainer.validate(task, datamodule=datamodule, verbose=False)
    metrics = {k.removeprefix("val/"): round(float(v), 4) for k, v in (results[0] if results else {}).items()}
    metrics.update(checkpoint=str(Path(config.checkpoint).resolve()), data=data.val)
    print(json.dumps(metrics, indent=2))
    return metrics


def main() -> None:
    preflight(sys.argv[1:], "train")
    evaluate()


if __name__ == "__main__":
    main()
