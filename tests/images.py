"""Images for tests, as the bytes a file or an upload would hold: plain colours and synthetic shape pictures."""

from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image

from vlm.data import synthetic


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def solid(color: str | tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (48, 40),
          fmt: str = "PNG") -> bytes:
    """One colour, encoded."""
    return encode(Image.new("RGB", size, color), fmt)


def shapes(seed: int, size: int = 32, fmt: str = "PNG") -> bytes:
    """A random synthetic shapes picture (what the default dataset draws), encoded."""
    rng = random.Random(seed)
    return encode(synthetic.render(synthetic.random_spec(rng), random.Random(seed), size), fmt)


def noise(seed: int, size: tuple[int, int] = (16, 12), fmt: str = "PNG") -> bytes:
    """Random pixels, encoded: every image differs from every other."""
    rng = random.Random(seed)
    return encode(Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3))), fmt)


def crafted_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
