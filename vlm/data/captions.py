"""Image-caption samples for the contrastive stage: tiled pixels, CLIP token ids and an optional class label."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

from vlm.config import ConfigError
from vlm.data.shards import SkipSample
from vlm.data.tiler import Tiler

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")  # what the tiler decodes


def image_fields(sample: dict) -> list[str]:
    """The sample's image fields in order: "png" alone, or "0.png", "1.jpg", ... sorted by their index."""
    fields = [k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]

    def index(field: str) -> tuple[int, str]:  # "10.png" after "2.jpg", and "1.jpg" before "0.webp" never
        stem = field.rpartition(".")[0]
        return (int(stem), field) if stem.isdigit() else (-1, field)

    return sorted(fields, key=index)


def text_field(sample: dict, name: str) -> str:
    value = sample.get(name)
    if value is None:
        raise SkipSample(f"no {name!r} field")
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as err:
        raise SkipSample(f"the {name!r} field is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise SkipSample(f"empty {name!r} field")
    return text


class CaptionDecoder:
    """Raw webdataset sample -> {"pixels": (3, S, S), "ids": (L,), "label": int (-1 when absent), "key": its shard
    and key, "caption": str}, and held out also "image_id": a fingerprint of the pixels, equal for samples that
    pair one image with several captions (retrieval counts any of them as a match)."""

    def __init__(self, tiler: Tiler, tokenizer: Callable[[list[str]], torch.Tensor],
                 classnames: list[str] | None = None, held_out: bool = False):
        if tiler.config.max_tiles != 1:
            raise ConfigError(f"tiler.max_tiles={tiler.config.max_tiles}: the contrastive stage encodes one tile per "
                              f"image; use tiler=low (tiler.max_tiles=1)", key="tiler.max_tiles")
        self.tiler = tiler
        self.tokenizer = tokenizer
        self.classnames = classnames  # given: a label must be an index into them (held-out samples, zero-shot)
        self.held_out = held_out

    def __call__(self, sample: dict) -> dict[str, Any]:
        fields = image_fields(sample)
        if not fields:
            raise SkipSample(f"no image field ({'/'.join(IMAGE_EXTENSIONS)})")
        if len(fields) > 1:  # which one the caption describes is anyone's guess
            raise SkipSample(f"{len(fields)} images ({', '.join(fields)}) for one caption; a caption sample holds one")
        if "txt" not in sample and "json" in sample:
            raise SkipSample("no 'txt' caption: it holds a conversation ('json'), which stage=align and sft read; "
                             "stage=contrastive trains on image + caption shards (data_scripts/images_to_shards.py)")
        caption = text_field(sample, "txt")
        key = f"{sample.get('__url__')}:{sample.get('__key__')}"
        tiled = self.tiler(sample[fields[0]], name=key)
        label = self._label(sample) if "cls" in sample else -1
        pixels = tiled.pixel_values[0]
        decoded = {"pixels": pixels, "ids": self.tokenizer([caption])[0], "label": label, "key": key,
                   "caption": caption}
        if self.held_out:
            digest = hashlib.blake2b(pixels.numpy().tobytes(), digest_size=8).digest()
            decoded["image_id"] = int.from_bytes(digest, "little", signed=True)
        return decoded

    def _label(self, sample: dict) -> int:
        text = text_field(sample, "cls").strip()
        if self.classnames is None:  # training reads no label: one it cannot use is no reason to skip the sample
            return int(text) if text.lstrip("-").isdigit() else -1
        if not text.isdigit() or int(text) >= len(self.classnames):
            raise SkipSample(f"its 'cls' {text!r} is not a class index 0-{len(self.classnames) - 1} of the "
                             f"{len(self.classnames)} class names (classnames.txt, data.classnames)")
        return int(text)


def collate_captions(samples: list[dict]) -> dict[str, torch.Tensor | list[str]]:
    batch = {"pixels": torch.stack([s["pixels"] for s in samples]),  # (B, 3, S, S)
             "ids": torch.stack([s["ids"] for s in samples]),  # (B, L)
             "labels": torch.tensor([s["label"] for s in samples]),  # (B,)
             "keys": [s["key"] for s in samples], "captions": [s["caption"] for s in samples]}
    if "image_id" in samples[0]:  # held out
        batch["image_ids"] = torch.tensor([s["image_id"] for s in samples])  # (B,) int64
    return batch
