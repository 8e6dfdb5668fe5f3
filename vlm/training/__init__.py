"""Lightning glue: one LightningModule per phase, the shard DataModule and callbacks. The only place that imports
Lightning."""

import logging
import warnings

# Lightning advertises its cloud logger on every run, and torch's pytree deprecation leaks through Lightning; neither
# tells a vlm user anything they can act on.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "💡" not in record.getMessage())
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
