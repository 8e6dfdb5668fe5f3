"""Lightning glue: one LightningModule per phase, the shard DataModule, the callbacks and the Trainers that run them
(`trainer.py`: `vlm.train`'s and `vlm.eval`'s). Importing it quiets what Lightning prints that a vlm user cannot act
on."""

import logging
import os
import warnings


def _worth_reading(record: logging.LogRecord) -> bool:
    """Lightning advertises its cloud logger on every run, and reports `limit_val_batches`, which vlm sets from
    eval.max_samples and reports in those words itself."""
    message = record.getMessage()
    return "💡" not in message and not message.startswith("`Trainer(limit_val_batches=")


def _not_open_clip_chatter(record: logging.LogRecord) -> bool:
    """open_clip logs each model and tokenizer lookup at INFO on the root logger ("Parsing tokenizer identifier.
    Schema: None, Identifier: ViT-B-32"), which Hydra's logging prints in every contrastive run."""
    return record.levelno >= logging.WARNING or f"{os.sep}open_clip{os.sep}" not in record.pathname


def quiet_lightning() -> None:
    """Hide what Lightning and torch print that a vlm user cannot act on. Runs on import; call it again inside a
    `warnings.catch_warnings()` block, which restores the filters it found."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_worth_reading)
    logging.getLogger().addFilter(_not_open_clip_chatter)  # a root filter: Hydra's logging setup keeps it
    # torch's pytree deprecation leaks through Lightning and tells a vlm user nothing they can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # frozen parts (and DPO's reference) are kept in eval mode on purpose (vlm/training/freezing.py), and the
    # parameter table says which; Lightning's warning about modules in eval mode would only alarm
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # vlm's val/ metrics are logged once per validation from every rank's scores, gathered first (HeldOutShare), so
    # Lightning's advice to sync epoch-level values across ranks does not apply to them
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")
    # a run folder that holds checkpoints is only ever reopened by resume=auto or resume=PATH (vlm refuses to start a
    # new run there), so Lightning's warning that the folder is not empty is the resume working as asked
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # without data.val the held-out loader is an empty list, and the run has already said it validates nothing
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")


quiet_lightning()
