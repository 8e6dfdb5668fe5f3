"""Lightning glue: one LightningModule per phase, the shard DataModule and callbacks. The only place that imports
Lightning."""

import logging
import warnings


def _worth_reading(record: logging.LogRecord) -> bool:
    """Lightning advertises its cloud logger on every run, and reports `limit_val_batches`, which vlm sets from
    eval.max_samples and reports in those words itself."""
    message = record.getMessage()
    return "💡" not in message and not message.startswith("`Trainer(limit_val_batches=")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_worth_reading)
# torch's pytree deprecation leaks through Lightning and tells a vlm user nothing they can act on
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
