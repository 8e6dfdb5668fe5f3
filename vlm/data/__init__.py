"""Data: the tiler, the processor, webdataset pipelines and the synthetic shapes dataset."""
