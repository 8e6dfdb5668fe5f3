"""Lightning glue: one LightningModule per phase, the shard DataModule and callbacks. The only place that imports
Lightning."""
