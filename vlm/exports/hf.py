"""`format=hf` (placeholder until the transformers route lands)."""

from __future__ import annotations

from pathlib import Path

from vlm.exports.format import ConversionError


def export_hf(checkpoint: Path, out: Path) -> Path:
    raise ConversionError("format=hf is not available yet")
