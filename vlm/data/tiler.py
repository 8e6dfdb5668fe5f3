"""The resolution-aware tiler: the one path every image takes into the model.

It owns decoding (any PIL-readable file, bytes or PIL image), colour normalisation to RGB (EXIF orientation,
transparency, CMYK, 16-bit, 1-bit, palette, first frame of animations), the decompression-bomb guard, the
6144x4096 resolution cap, best-fit grid selection (LLaVA-NeXT "anyres" criterion), and cutting the image into
encoder-sized, mean/std-normalised tiles plus a global thumbnail. Training, eval, inference and the HTTP server all
use it, so it refuses bad input with one error type (`ImageLoadError`) and never fully decodes a large JPEG when the
tiles need far fewer pixels (JPEG DCT-domain downscaling via `Image.draft`).

Choices worth knowing:
- Padding (letterboxing inside the grid canvas and the thumbnail) uses the encoder *mean* colour, so padded pixels are
  exactly 0 after normalisation, as in the original LLaVA `expand2square`. Transparency is composited onto
  `tiler.background` instead, because that is part of the picture the user sent.
- Images are resized *into* the grid canvas keeping aspect ratio, so a 16x16 icon is upscaled to fill one tile (what
  the encoder was trained on). The 6144x4096 cap itself never upscales.
- PIL has a global bomb guard (`Image.MAX_IMAGE_PIXELS`, ~89 MP warns, ~179 MP raises). The tiler enforces its own
  `max_pixels` from the header and, only while parsing the header (and while decoding an image already above PIL's
  threshold), raises PIL's global to that limit under a module lock, restoring it afterwards. The global is never set
  to None or lowered, so other code keeps its safety.

CLI: `python -m vlm.data.tiler IMAGE [--tile-size N] [--max-tiles N] [--tokens-per-tile N] [--save DIR]`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from vlm.config import TilerConfig
from vlm.errors import UserError

# Same values as timm.data.constants / transformers' OPENAI_CLIP_*; kept here so the tiler imports fast.
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageLoadError(UserError, ValueError):
    """The input could not be turned into tiles: undecodable, truncated, empty, not an image, or too large.

    The message always names the source (the path, or the `name=` given, e.g. a webdataset shard key).
    `image_index`: which of a sample's images it was, where the processor tiled several.
    """

    image_index: int | None = None


@dataclass
class TiledImage:
    """One image, ready for the vision encoder."""

    pixel_values: torch.Tensor  # (N, 3, S, S) float32, normalised; grid tiles row-major, then the thumbnail last
    grid: tuple[int, int]  # (rows, cols)
    num_tokens: int  # image tokens the model will spend = N * tokens_per_tile
    original_size: tuple[int, int]  # (width, height) after EXIF orientation
    capped_size: tuple[int, int]  # (width, height) after the 6144x4096 cap


def _fit_score(width: int, height: int, canvas_w: int, canvas_h: int) -> tuple[int, int]:
    """(effective, wasted) pixels of fitting width x height into a canvas, as LLaVA-NeXT's select_best_resolution.

    Same float expressions as transformers so ties break identically; the only difference is that a side that
    would truncate to 0 pixels counts as 1 (the resize really keeps 1 px), which matters for 1x10000-like images,
    where transformers scores every candidate 0 and falls back to the single tile.
    """
    scale = min(canvas_w / width, canvas_h / height)
    scaled_w = max(1, int(width * scale))
    scaled_h = max(1, int(height * scale))
    effective = min(scaled_w * scaled_h, width * height)
    return effective, canvas_w * canvas_h - effective


def select_grid(width: int, height: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """Best-fit (rows, cols) with rows * cols <= max_tiles for a width x height image and tile_size tiles.

    Maximises the effective resolution min(scaled_w * scaled_h, width * height) and breaks ties by the fewest padded
    pixels (LLaVA-NeXT anyres). Candidates are tried rows-major (rows 1.., then cols 1..); the first best wins.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if tile_size < 1 or max_tiles < 1:
        raise ValueError(f"tile_size and max_tiles must be >= 1, got {tile_size} and {max_tiles}")
    best = (1, 1)
    best_effective, best_wasted = -1, 0
    for rows in range(1, max_tiles + 1):
        for cols in range(1, max_tiles // rows + 1):
            effective, wasted = _fit_score(width, height, cols * tile_size, rows * tile_size)
            if effective > best_effective or (effective == best_effective and wasted < best_wasted):
                best, best_effective, best_wasted = (rows, cols), effective, wasted
    return best


def _fit_size(width: int, height: int, box_w: int, box_h: int) -> tuple[int, int]:
    """Size of width x height scaled (up or down) to fit inside box_w x box_h, keeping aspect; never 0."""
    scale = min(box_w / width, box_h / height)
    return min(box_w, max(1, round(width * scale))), min(box_h, max(1, round(height * scale)))


def _cap_size(width: int, height: int, max_long: int, max_short: int) -> tuple[int, int]:
    """Scale down (never up) so the long side <= max_long and the short side <= max_short."""
    max_short = min(max_short, max_long)
    limit_w, limit_h = (max_long, max_short) if width >= height else (max_short, max_long)
    if width <= limit_w and height <= limit_h:
        return width, height
    return _fit_size(width, height, limit_w, limit_h)


def sniff_media_type(data: bytes) -> str | None:
    """The media type the bytes' signature says, for the formats both APIs accept."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def pil_bomb_limit(max_pixels: int) -> Iterator[None]:
    """Let PIL's global bomb guard admit images up to `max_pixels` inside the block, then restore it.

    Only ever raises the threshold (never None, never lower) and holds a lock, so two tilers in different threads
    cannot restore each other's value and leave the global changed. PIL's DecompressionBombWarning is silenced inside:
    an image over `max_pixels` gets the caller's error, and one under it is wanted.
    """
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        # PIL warns from its threshold to twice it; the caller refuses anything over `max_pixels` with its own message
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        if saved is not None and saved < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except (TypeError, ValueError):
        return 1  # a malformed tag: show the image as stored, like exif_transpose does


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited onto `background`; 16-bit is scaled, not clipped."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in _SIXTEEN_BIT_MODES:
        # PIL's own I;16 -> L conversion clips at 255; map 0..65535 onto 0..255 instead.
        arr = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)  # (H, W)
        return Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    try:
        return im.convert("RGB")
    except ValueError:  # modes without a direct RGB conversion (e.g. F) go through L
        return im.convert("L").convert("RGB")


def _to_uint8_tensor(rgb: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """RGB PIL image -> (1, 3, h, w) uint8 tensor of `size` (w, h); the bulk of a big downscale is done cheaply.

    PIL's integer `reduce` (box filter) first shrinks while at least 2x the target remains (PIL's own
    reducing_gap=2 scheme, visually indistinguishable), then torch's antialiased bicubic on uint8 does the rest: it
    matches PIL's BICUBIC to ~70 dB and is several times faster.
    """
    factor = min(rgb.width // (2 * size[0]), rgb.height // (2 * size[1]))
    if factor >= 2:
        rgb = rgb.reduce(factor)
    img = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W), channels-last memory
    return _resize(img, size)


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, 3, H, W) uint8 -> (1, 3, h, w) uint8 for size (w, h), antialiased bicubic (PIL-like)."""
    if (img.shape[-1], img.shape[-2]) == size:
        return img
    return F.interpolate(img, size=(size[1], size[0]), mode="bicubic", antialias=True)


@dataclass(frozen=True)
class _Layout:
    """Where an image's pixels go, from its size alone."""

    size: tuple[int, int]  # (width, height) after EXIF orientation
    capped: tuple[int, int]  # (width, height) after the cap
    grid: tuple[int, int]  # (rows, cols)
    target: tuple[int, int]  # (width, height) of the image inside the grid canvas
    need: tuple[int, int]  # (width, height) worth decoding: target, but never above the cap
    swapped: bool  # EXIF orientation swaps width and height


class TileWriter:
    """Writes uint8 pixels into normalised float32 tiles of `tile_size`, as x * scale - shift, which equals
    (x / 255 - mean) / std."""

    def __init__(self, tile_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.tile_size = tile_size
        std_a = np.array(std, dtype=np.float64).reshape(3, 1, 1)
        self.scale = (1.0 / (255.0 * std_a)).astype(np.float32)  # (3, 1, 1)
        self.shift = (np.array(mean, dtype=np.float64).reshape(3, 1, 1) / std_a).astype(np.float32)  # (3, 1, 1)

    def paste_grid(self, tiles: np.ndarray, img: np.ndarray, rows: int, cols: int) -> None:
        """Centre uint8 img (3, h, w) in the (rows*S, cols*S) canvas and write it, normalised, as row-major tiles
        (rows*cols, 3, S, S). Tile by tile rather than via a whole canvas: one pass over memory, cache-sized pieces."""
        s = self.tile_size
        _, h, w = img.shape
        y0, x0 = (rows * s - h) // 2, (cols * s - w) // 2  # image origin on the canvas
        for r in range(rows):
            for c in range(cols):
                # the part of the image that falls on tile (r, c), in canvas coordinates
                top, bottom = max(y0, r * s), min(y0 + h, (r + 1) * s)
                left, right = max(x0, c * s), min(x0 + w, (c + 1) * s)
                tile = tiles[r * cols + c]
                if top >= bottom or left >= right:
                    tile.fill(0.0)  # all padding
                    continue
                part = img[:, top - y0 : bottom - y0, left - x0 : right - x0]
                self.paste(tile, part, top - r * s, left - c * s)

    def paste(self, dst: np.ndarray, img: np.ndarray, y: int, x: int) -> None:
        """Write uint8 img (3, h, w) normalised into float32 dst (3, S, S) at (y, x); everything else gets the mean
        colour, which is 0 once normalised."""
        _, h, w = img.shape
        dst[:, :y] = 0.0
        dst[:, y + h :] = 0.0
        dst[:, y : y + h, :x] = 0.0
        dst[:, y : y + h, x + w :] = 0.0
        region = dst[:, y : y + h, x : x + w]  # (3, h, w)
        np.multiply(img, self.scale, out=region)  # uint8 -> float32 and scale in one pass
        np.subtract(region, self.shift, out=region)


class Tiler:
    """Turns any image into a bounded set of encoder-sized, normalised tiles (see the module docstring)."""

    def __init__(
        self,
        config: TilerConfig,
        tile_size: int,
        tokens_per_tile: int,
        mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        std: tuple[float, float, float] = OPENAI_CLIP_STD,
    ) -> None:
        if not isinstance(config, TilerConfig):
            raise TypeError(f"config must be a TilerConfig, got {type(config).__name__}")
        for key, value in (("tile_size", tile_size), ("tokens_per_tile", tokens_per_tile)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Tiler {key} must be a positive integer, got {value!r}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"Tiler mean/std must be 3 values each with std > 0, got mean={mean!r} std={std!r}")
        self.config = config
        self.tile_size = tile_size
        self.tokens_per_tile = tokens_per_tile
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._writer = TileWriter(tile_size, self.mean, self.std)

    # ---- planning (pure functions of the size) ----

    def plan(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(capped_size, grid) for an image of width x height (after EXIF orientation)."""
        if isinstance(width, bool) or isinstance(height, bool) or int(width) < 1 or int(height) < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        capped = _cap_size(int(width), int(height), self.config.max_long_side, self.config.max_short_side)
        return capped, select_grid(*capped, self.tile_size, self.config.max_tiles)

    def num_tiles_for_grid(self, grid: tuple[int, int]) -> int:
        cells = grid[0] * grid[1]
        return cells + (1 if self.config.thumbnail and cells > 1 else 0)

    def num_tokens_for(self, width: int, height: int) -> int:
        """Image tokens an image of width x height will cost, without decoding any pixels."""
        return self.num_tiles_for_grid(self.plan(width, height)[1]) * self.tokens_per_tile

    # ---- tiling ----

    def __call__(self, source: str | os.PathLike | bytes | Image.Image, name: str | None = None) -> TiledImage:
        """Decode `source` (path, encoded bytes or PIL image) and tile it. Raises ImageLoadError for bad input.

        A PIL image is used as given (its current frame) and is not modified; paths and bytes use the first frame.
        """
        if isinstance(source, Image.Image):
            return self._tile(source, name or "<PIL image>", owned=False)
        if isinstance(source, bytes | bytearray | memoryview):
            label = name or "<image bytes>"
            if len(source) == 0:
                raise ImageLoadError(f"{label}: empty input (0 bytes), not an image")
            fp: str | io.BytesIO = io.BytesIO(source)
        elif isinstance(source, str | os.PathLike):
            fp = os.fspath(source)
            label = name or fp
            try:
                if os.path.getsize(fp) == 0:
                    raise ImageLoadError(f"{label}: empty file (0 bytes), not an image")
            except OSError as e:
                raise ImageLoadError(f"{label}: cannot read the image file ({e.strerror or e})") from e
        else:
            raise TypeError(f"Tiler input must be a path, bytes or a PIL image, got {type(source).__name__}")
        try:
            with pil_bomb_limit(self.config.max_pixels):
                im = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageLoadError(self._bomb_message(label, None, str(e))) from e
        except UnidentifiedImageError as e:
            raise ImageLoadError(f"{label}: not an image, or not a format this Pillow build can read") from e
        except Exception as e:  # PIL raises many types for garbage input; the caller needs exactly one
            raise ImageLoadError(f"{label}: not a readable image ({e})") from e
        with im:
            return self._tile(im, label, owned=True)

    def _bomb_message(self, label: str, size: tuple[int, int] | None, pil_message: str = "") -> str:
        if size is not None:
            what = f"{size[0]}x{size[1]} ({size[0] * size[1]:,} pixels)"
        else:
            found = re.search(r"\((\d+) pixels\)", pil_message)
            what = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        return (
            f"{label}: image is {what}, over the limit of {self.config.max_pixels:,} pixels "
            "(tiler.max_pixels); refused without decoding it"
        )

    def _layout(self, stored: tuple[int, int], orientation: int) -> _Layout:
        swapped = orientation in _TRANSPOSING_ORIENTATIONS
        width, height = (stored[1], stored[0]) if swapped else stored
        capped, grid = self.plan(width, height)
        target = _fit_size(*capped, grid[1] * self.tile_size, grid[0] * self.tile_size)  # image inside the canvas
        # Pixels worth decoding: the grid's need, but never more than the cap (a bigger canvas is an upscale).
        need = (min(target[0], capped[0]), min(target[1], capped[1]))
        return _Layout((width, height), capped, grid, target, need, swapped)

    def _tile(self, im: Image.Image, label: str, owned: bool) -> TiledImage:
        stored = im.size
        if stored[0] * stored[1] > self.config.max_pixels:  # header-only: nothing decoded yet
            raise ImageLoadError(self._bomb_message(label, stored))
        big = Image.MAX_IMAGE_PIXELS is not None and stored[0] * stored[1] > Image.MAX_IMAGE_PIXELS
        try:
            # Some plugins re-check PIL's guard while decoding; an image past PIL's threshold but within ours passes.
            with pil_bomb_limit(self.config.max_pixels) if big else contextlib.nullcontext():
                if owned and self.config.draft and isinstance(im, JpegImagePlugin.JpegImageFile):
                    # JPEG keeps EXIF in the header, so plan first, then decode at 1/2, 1/4 or 1/8 scale in the DCT
                    # domain (PIL picks the smallest scale still >= the request, in stored orientation).
                    layout = self._layout(stored, _exif_orientation(im))
                    im.draft("RGB", layout.need[::-1] if layout.swapped else layout.need)
                im.load()  # other formats may keep EXIF after the pixels (PNG), so read it once decoded
                orientation = _exif_orientation(im)
                layout = self._layout(stored, orientation)
                if orientation in (2, 3, 4, 5, 6, 7, 8):
                    im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im, self.config.background)
        except Exception as e:  # truncated data, decoder errors, unsupported modes
            raise ImageLoadError(f"{label}: cannot decode the image ({e})") from e

        img = _to_uint8_tensor(rgb, layout.need)  # (1, 3, h, w) uint8
        img = _resize(img, layout.target)  # only differs from `need` when the canvas is larger than the cap
        s = self.tile_size
        rows, cols = layout.grid
        n = self.num_tiles_for_grid(layout.grid)
        out = torch.empty(n, 3, s, s)  # (N, 3, S, S)
        # Per-tile work is done in numpy on a view of `out`: single-threaded and predictable, whereas many small
        # multi-threaded torch ops stall badly when the CPU is shared (e.g. dataloader workers, a busy server).
        tiles = out.numpy()
        self._writer.paste_grid(tiles[: rows * cols], img[0].numpy(), rows, cols)
        if n > rows * cols:
            thumb = _resize(img, _fit_size(*layout.capped, s, s))[0].numpy()  # (3, h, w), h and w <= S
            self._writer.paste(tiles[-1], thumb, (s - thumb.shape[1]) // 2, (s - thumb.shape[2]) // 2)
        return TiledImage(
            pixel_values=out,
            grid=layout.grid,
            num_tokens=n * self.tokens_per_tile,
            original_size=layout.size,
            capped_size=layout.capped,
        )

    def to_images(self, tiled: TiledImage) -> list[Image.Image]:
        """De-normalise tiles back to PIL images (for people to look at; see the CLI's --save)."""
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        pixels = (tiled.pixel_values * std + mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8)  # (N, 3, S, S)
        return [Image.fromarray(t.permute(1, 2, 0).contiguous().numpy()) for t in pixels]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlm.data.tiler",
        description="Show how an image is tiled for the vision encoder: sizes, grid, tile count and token cost.",
    )
    parser.add_argument("image", help="path to an image file (JPEG, PNG, GIF, WebP, TIFF, ...)")
    parser.add_argument("--tile-size", type=int, default=336, help="encoder input size S in pixels (default 336)")
    parser.add_argument("--max-tiles", type=int, default=12, help="most grid tiles, thumbnail not counted (default 12)")
    parser.add_argument(
        "--tokens-per-tile", type=int, default=576, help="image tokens the model spends per tile (default 576)"
    )
    parser.add_argument("--save", metavar="DIR", help="also write the tiles as PNGs into DIR, for a person to look at")
    args = parser.parse_args(argv)
    for flag, value in (("--tile-size", args.tile_size), ("--max-tiles", args.max_tiles),
                        ("--tokens-per-tile", args.tokens_per_tile)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")  # exit code 2, with the usage

    try:
        tiler = Tiler(TilerConfig(max_tiles=args.max_tiles), args.tile_size, args.tokens_per_tile)
        tiled = tiler(args.image)
    except (ImageLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows, cols = tiled.grid
    n = tiled.pixel_values.shape[0]
    thumb = " + thumbnail" if n > rows * cols else ""
    print(f"image:          {args.image}")
    print(f"original size:  {tiled.original_size[0]}x{tiled.original_size[1]} (width x height, EXIF-oriented)")
    print(f"capped size:    {tiled.capped_size[0]}x{tiled.capped_size[1]}")
    print(f"grid:           {rows}x{cols} (rows x cols){thumb}")
    print(f"tiles:          {n} of {args.tile_size}x{args.tile_size}")
    print(f"image tokens:   {tiled.num_tokens} ({args.tokens_per_tile} per tile)")

    if args.save:
        out_dir = Path(args.save)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            for stale in out_dir.glob("tile_*.png"):  # an earlier image's tiles would read as this one's
                stale.unlink()
            for i, tile in enumerate(tiler.to_images(tiled)):
                label = "thumbnail" if i >= rows * cols else f"r{i // cols}c{i % cols}"
                tile.save(out_dir / f"tile_{i:02d}_{label}.png")
        except OSError as e:
            print(f"error: cannot write tiles to {out_dir}: {e}", file=sys.stderr)
            return 2
        print(f"saved:          {n} PNGs in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
