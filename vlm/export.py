"""`python -m vlm.export checkpoint=EXPORT format=hf|open_clip out=DIR` (or `vlm-export`): convert an export folder
for use outside vlm.

format=hf turns an align or sft export into a transformers folder (`AutoModelForImageTextToText`, `AutoProcessor`,
`pipeline("image-text-to-text")`); format=open_clip turns a contrastive export into an open_clip folder
(`open_clip.create_model_and_transforms("local-dir:DIR")`). Settings live in configs/export.yaml.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vlm.cli import CONFIG_DIR, preflight, setup_logging, user_errors
from vlm.config import ConfigError, load_config, setting
from vlm.exports.format import require_export_folder
from vlm.exports.hf import ROUTES, export_hf
from vlm.exports.open_clip import export_open_clip

FORMATS = ("hf", "open_clip")


@dataclass
class ExportConfig:
    """configs/export.yaml, which gives every default and documents each key."""

    checkpoint: str | None = setting()  # the export folder to convert
    format: str = setting(choices=FORMATS)  # hf (align / sft exports) or open_clip (contrastive exports)
    out: str | None = setting()  # the folder to write: new or empty
    hf_route: str = setting(choices=ROUTES)  # format=hf: stock (no remote code), remote_code, auto (stock if it maps)
    log_level: str = setting()


def convert(config: ExportConfig) -> Path:
    """Write `config.out` from `config.checkpoint` in `config.format`."""
    if not config.checkpoint:
        raise ConfigError("checkpoint=PATH is required: an export folder, e.g. checkpoint=checkpoints/sft/RUN/export")
    if not config.out:
        raise ConfigError("out=DIR is required: the folder to write (new or empty)")
    checkpoint, out = Path(config.checkpoint).expanduser(), Path(config.out).expanduser()
    require_export_folder(checkpoint)
    if config.format == "open_clip":
        return export_open_clip(checkpoint, out)
    return export_hf(checkpoint, out, config.hf_route)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def export(cfg: DictConfig) -> None:
    with user_errors():
        config = load_config(ExportConfig, cfg)
    setup_logging(config.log_level)
    with user_errors():
        print(convert(config))


def main() -> None:
    preflight(sys.argv[1:], "export")
    export()


if __name__ == "__main__":
    main()
