"""Export folders: what a finished stage leaves behind, and what later stages, `vlm.eval`, `vlm.infer` and
`vlm.serve` load. `format` owns the folder layout and its metadata; `clip` and `vlm` write and read each phase's
models; `open_clip` and `hf` (with `hf_stock` and the shipped code in `hf_remote/`) convert them for other libraries
(`vlm.export`)."""
