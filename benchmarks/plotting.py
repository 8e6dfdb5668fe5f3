"""The plotting dependency of the benchmarks that save a PNG, checked before any measuring starts."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType


def plot_path(value: str) -> Path | None:
    """argparse type for --plot: a PNG path, or `none` to skip the plot."""
    return None if value.lower() == "none" else Path(value)


def pyplot_or_exit(path: Path | None) -> ModuleType | None:
    """matplotlib.pyplot with a file-only backend, None when no plot is wanted, or exit at once with what to install
    (not after minutes of measuring)."""
    if path is None:
        return None
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"--plot {path} needs matplotlib: pip install -e '.[bench]' (or pass --plot none)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
