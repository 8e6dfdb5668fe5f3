"""Benchmark: vlm's tiler vs transformers' LlavaNextImageProcessor, from encoded bytes to normalised tile tensors.

Generates natural-looking test images in a temp dir (a 6144x4096 JPEG, a 12000x8000 JPEG, a 4000x3000 PNG), then
times both sides on each, every (image, side) pair in its own subprocess so that peak memory is honest: the peak
resident set size (/proc VmHWM, reset via /proc/self/clear_refs just before the first call) minus the resident size at
that moment (after imports, with the bytes already read). getrusage's ru_maxrss is not used: on Linux a child inherits
its parent's peak through fork/exec, which here would be the image generator's. Both sides decode the bytes inside
the timed region; transformers gets `Image.open(BytesIO(b)).convert("RGB")`. Both use tile size S and the same
candidate grids (every rows x cols with rows * cols <= max_tiles, i.e. LLaVA-NeXT pinpoints [rows * S, cols * S]),
so both produce rows * cols + 1 tiles.

Usage: python benchmarks/tiler.py [--tile-size 336] [--max-tiles 12] [--repeats 5] [--threads N] [--pil-backend]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from arguments import at_least  # benchmarks/, this script's folder
from PIL import Image

from vlm.data import synthetic

IMAGES = (
    ("6144x4096 JPEG", 6144, 4096, "JPEG"),
    ("12000x8000 JPEG", 12000, 8000, "JPEG"),
    ("4000x3000 PNG", 4000, 3000, "PNG"),
)


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so import-time peaks do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(side: str, image: str, tile_size: int, max_tiles: int, repeats: int, threads: int | None) -> dict:
    """Runs in a fresh process: one warm-up call, then `repeats` timed calls, bytes -> (N, 3, S, S) tensor."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    data = Path(image).read_bytes()
    if side == "ours":
        from vlm.config import TilerConfig
        from vlm.data.tiler import Tiler

        tiler = Tiler(TilerConfig(max_tiles=max_tiles), tile_size=tile_size, tokens_per_tile=1)

        def run() -> torch.Tensor:
            return tiler(data).pixel_values
    else:
        import warnings

        from transformers import LlavaNextImageProcessor, LlavaNextImageProcessorPil

        # PIL itself warns about > 89 MP images on open; that is PIL, not the processor under test.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        cls = LlavaNextImageProcessorPil if side == "hf-pil" else LlavaNextImageProcessor
        pinpoints = [
            [r * tile_size, c * tile_size] for r in range(1, max_tiles + 1) for c in range(1, max_tiles // r + 1)
        ]
        processor = cls(
            size={"shortest_edge": tile_size},
            crop_size={"height": tile_size, "width": tile_size},
            do_center_crop=True,  # tiles are already S x S, so the crop is a no-op (as in LLaVA-NeXT)
            image_grid_pinpoints=pinpoints,
        )

        def run() -> torch.Tensor:
            rgb = Image.open(io.BytesIO(data)).convert("RGB")
            return torch.as_tensor(processor(rgb, return_tensors="pt")["pixel_values"][0])

    rss_before = _status_mib("VmRSS")
    reset = _reset_peak_rss()
    shape = tuple(run().shape)  # warm-up (lazy imports, caches); counted in the peak, not in the times
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "shape": shape,
        "peak_rss_mib": _status_mib("VmHWM"),
        "peak_delta_mib": _status_mib("VmHWM") - rss_before,
        "peak_reset": reset,
        "threads": torch.get_num_threads(),
    }


def run_worker(side: str, image: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--image",
        str(image),
        "--tile-size",
        str(args.tile_size),
        "--max-tiles",
        str(args.max_tiles),
        "--repeats",
        str(args.repeats),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
        ),
    )
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        sys.exit(f"benchmark worker {side} on {image.name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile-size", type=at_least(1), default=336, help="tile size S (default 336)")
    parser.add_argument("--max-tiles", type=at_least(1), default=12, help="most grid tiles (default 12)")
    parser.add_argument("--repeats", type=at_least(1), default=5, help="timed calls per image and side (default 5)")
    parser.add_argument("--threads", type=at_least(1), default=None,
                        help="torch threads in each worker (default: torch's)")
    parser.add_argument("--pil-backend", action="store_true", help="also time transformers' PIL-backend processor")
    parser.add_argument("--worker", choices=["ours", "hf", "hf-pil"], help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = worker(args.worker, args.image, args.tile_size, args.max_tiles, args.repeats, args.threads)
        print(json.dumps(result))
        return

    import PIL
    import torch
    import transformers

    sides = ["ours", "hf"] + (["hf-pil"] if args.pil_backend else [])
    print(f"tiler benchmark: S={args.tile_size}, max_tiles={args.max_tiles}, {args.repeats} timed repeats (+1 warm-up)")
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Pillow {PIL.__version__}"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="tiler-bench-") as tmp:
        for label, width, height, fmt in IMAGES:
            path = Path(tmp) / f"{width}x{height}.{fmt.lower()}"
            synthetic.photo(width, height).save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            size_mb = path.stat().st_size / 1e6
            results = {side: run_worker(side, path, args) for side in sides}
            rows.append((label, size_mb, results))

    reset = all(r["peak_reset"] for _, _, results in rows for r in results.values())
    print("\nmedian seconds per image (bytes -> normalised tiles); peak +MiB = peak RSS (VmHWM) minus RSS before the")
    note = "" if reset else " (peak reset unavailable: includes import-time peaks)"
    print(f"first call, each (image, side) in its own process{note}\n")
    header = (
        f"{'image':<16} {'file MB':>7} {'side':<7} {'s/image':>8} {'HF/ours':>8} {'peak +MiB':>9} {'tiles':>14} "
        f"{'thr':>3}"
    )
    print(header)
    print("-" * len(header))
    for label, size_mb, results in rows:
        ours = results["ours"]["median_s"]
        for side, r in results.items():
            ratio = f"{r['median_s'] / ours:7.1f}x" if side != "ours" else f"{'':>8}"
            shape = "x".join(str(d) for d in r["shape"])
            print(
                f"{label:<16} {size_mb:7.1f} {side:<7} {r['median_s']:8.3f} {ratio} {r['peak_delta_mib']:9.0f} "
                f"{shape:>14} {r['threads']:>3}"
            )
    print("\nratio = transformers median / ours median (higher is better for ours)")


if __name__ == "__main__":
    main()
