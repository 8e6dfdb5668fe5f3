"""Export folders: what later stages, `vlm.eval`, `vlm.infer` and `vlm.serve` load. Safetensors only, no pickle.

A folder holds `config.json` (the stage, the model and tiler settings), `model.safetensors` and a `tokenizer/`
folder. It is written under a temporary name and renamed into place, so a crash never leaves a half export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn

FORMAT = "vlm-export/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


class ExportError(FileNotFoundError):
    """An export folder that is missing or lacks a file; the message names it."""


def write_export(directory: str | Path, model: nn.Module, meta: dict[str, Any], tokenizer_writer) -> Path:
    """Save `model` and `meta`; `tokenizer_writer(path)` writes the tokenizer files into `path`."""
    directory = Path(directory)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / TOKENIZER_DIR).mkdir(parents=True)
    save_model(model, str(staging / WEIGHTS_FILE))  # handles tied weights (shared storage)
    (staging / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=2))
    tokenizer_writer(staging / TOKENIZER_DIR)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory


def read_meta(directory: str | Path, expect_stage: tuple[str, ...] | None = None) -> dict[str, Any]:
    """config.json of an export folder, after checking every required file is there."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ExportError(f"export folder {str(directory)!r} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR):
        if not (directory / name).exists():
            raise ExportError(f"export folder {str(directory)!r} is missing {name!r}; re-export it from its run")
    meta = json.loads((directory / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ExportError(f"{str(directory / CONFIG_FILE)!r} is not a vlm export (format {meta.get('format')!r})")
    if expect_stage and meta.get("stage") not in expect_stage:
        raise ExportError(f"{str(directory)!r} holds a {meta.get('stage')!r} model; "
                          f"expected one of {list(expect_stage)}")
    return meta


def load_weights(model: nn.Module, directory: str | Path, strict: bool = True) -> None:
    missing, unexpected = load_model(model, str(Path(directory).expanduser() / WEIGHTS_FILE), strict=False)
    if strict and (missing or unexpected):
        raise ExportError(f"{str(directory)!r} does not match the model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
