"""Benchmark: how close the exports' stock preprocessing comes to vlm's tiler, on a real photo.

A stock `format=hf` export reads images with transformers' PerceptionLM processor, an `format=open_clip` export with
open_clip's `resize_mode="longest"` transform. Both resize straight to the tile with antialiased bicubic; vlm's tiler
first shrinks an image at least four times the tile's side with a box filter (PIL's `reduce`, fast on 6144x4096
photos), then resizes. This prints, for square crops of matplotlib's sample photo (Grace Hopper) resized to sides from
below the tile to eight times it, the largest and the mean absolute difference of the normalised pixels (units of the
normalisation's std: 1.0 is a whole std of the data), for each route against vlm's single tile.

Usage: python benchmarks/export_pixels.py [--tile-size 224] [--sides 112 224 895 896 1344 1792]
(needs matplotlib: pip install -e ".[bench]")
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import matplotlib.cbook
import open_clip
import torch
from PIL import Image
from transformers import PerceptionLMImageProcessor

from vlm.config import TilerConfig
from vlm.data.tiler import Tiler

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's, as ViT-B/16 exports


def square_photo(side: int) -> Image.Image:
    """The sample photo's central square, resized (Lanczos) to side x side: real detail at every size."""
    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    crop = min(photo.size)
    left, top = (photo.width - crop) // 2, (photo.height - crop) // 2
    return photo.crop((left, top, left + crop, top + crop)).resize((side, side), Image.LANCZOS)


def routes(tile_size: int) -> dict[str, Callable[[Image.Image], torch.Tensor]]:
    """Each export route's image -> (3, S, S) normalised pixels."""
    perception = PerceptionLMImageProcessor(vision_input_type="vanilla", tile_size=tile_size, max_num_tiles=1,
                                            image_mean=list(MEAN), image_std=list(STD))
    clip = open_clip.image_transform(tile_size, is_train=False, mean=MEAN, std=STD, interpolation="bicubic",
                                     resize_mode="longest", fill_color=round(sum(MEAN) / 3 * 255))
    return {"hf stock (PerceptionLM)": lambda im: perception(im, return_tensors="pt")["pixel_values"].reshape(
                3, tile_size, tile_size),
            "open_clip": lambda im: clip(im)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--sides", type=int, nargs="+", default=None,
                        help="square sides in pixels (default: 0.5, 1, 4 - 1 px, 4, 6 and 8 tiles)")
    args = parser.parse_args()
    s = args.tile_size
    sides = args.sides or [s // 2, s, 4 * s - 1, 4 * s, 6 * s, 8 * s]
    tiler = Tiler(TilerConfig(), tile_size=s, tokens_per_tile=1, mean=MEAN, std=STD)
    others = routes(s)
    print(f"tile {s} px; |difference| of normalised pixels against vlm's tiler: max / mean")
    print(f"{'side':>6} {'x tile':>7}  " + "  ".join(f"{name:>26}" for name in others))
    for side in sides:
        image = square_photo(side)
        ours = tiler(image).pixel_values[0]  # (3, S, S)
        cells = []
        for convert in others.values():
            gap = (convert(image).float() - ours).abs()
            cells.append(f"{gap.max().item():>12.4f} / {gap.mean().item():<11.5f}")
        print(f"{side:>6} {side / s:>7.2f}  " + "  ".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    main()
