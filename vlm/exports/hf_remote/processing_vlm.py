"""The processor of a vlm vision-language model for transformers: the single-tile tier of vlm's tiler (the image
fitted into one S x S tile, centred on the normalisation mean, antialiased bicubic), and each `<image>` in the text
expanded to the tile's image tokens. Written by `vlm.export format=hf` beside the weights."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import load_image

IMAGE_TOKEN = "<image>"
PADDING_OPTIONS = ("padding", "max_length", "pad_to_multiple_of", "padding_side", "return_attention_mask")


def fit_size(width: int, height: int, box_w: int, box_h: int) -> tuple[int, int]:
    """width x height scaled to fit inside box_w x box_h, keeping aspect; never 0."""
    scale = min(box_w / width, box_h / height)
    return min(box_w, max(1, round(width * scale))), min(box_h, max(1, round(height * scale)))


def pil_layout(array: np.ndarray) -> np.ndarray:
    """An image array as PIL reads it: (H, W, C) or (H, W); (C, H, W) is moved to channels last, and floats in
    [0, 1] (above 1: 0-255) become 8 bits, as transformers' image processors take them."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype.kind == "f":
        scale = 255.0 if array.size and float(array.max()) <= 1.0 else 1.0
        array = np.clip(np.round(array * scale), 0, 255).astype(np.uint8)
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    return np.ascontiguousarray(array)


class PipelineImageBatching:
    """The padding settings transformers' pipelines take from an image processor when they batch inputs: each input's
    pixel_values (N_images, 3, S, S) are concatenated along the first dimension, never padded, and the text keeps the
    tokenizer's padding side (left, for generation)."""

    padding_value = 0.0
    padding_side = None
    model_input_names = ["pixel_values"]


class VlmProcessor(ProcessorMixin):
    def __init__(self, tokenizer=None, chat_template: str | None = None, tile_size: int = 224,
                 tokens_per_tile: int = 1, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, background: list[int] | None = None,
                 max_long_side: int = 6144, max_short_side: int = 4096, **kwargs):
        self.tile_size, self.tokens_per_tile = tile_size, tokens_per_tile
        self.image_mean, self.image_std = list(image_mean or [0.5] * 3), list(image_std or [0.5] * 3)
        self.background = list(background or [255, 255, 255])
        self.max_long_side, self.max_short_side = max_long_side, max_short_side
        super().__init__(tokenizer, chat_template=chat_template)

    def tile(self, image) -> torch.Tensor:
        """An image (PIL, numpy array or torch tensor, path, URL or base64 string) -> (1, 3, S, S) normalised, as
        vlm's tiler with max_tiles=1: EXIF orientation applied, transparency over the background colour, 16-bit scaled
        to 8."""
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if isinstance(image, np.ndarray):
            image = Image.fromarray(pil_layout(image))
        elif isinstance(image, str | os.PathLike) and os.path.isfile(image):
            image = Image.open(image)  # as stored: its transparency is composited below
        elif not isinstance(image, Image.Image):
            image = load_image(image)  # a URL or base64
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 0..65535 scaled to 0..255 (PIL's convert clips)
            values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)  # (H, W)
            image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, tuple(self.background))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            image = canvas
        image = image.convert("RGB")
        s = self.tile_size
        width, height = image.size
        short = min(self.max_short_side, self.max_long_side)
        limit = (self.max_long_side, short) if width >= height else (short, self.max_long_side)
        if width > limit[0] or height > limit[1]:  # the resolution cap comes first, as in the tiler
            width, height = fit_size(width, height, *limit)
        size = fit_size(width, height, s, s)  # (w, h) inside the tile
        factor = min(image.width // (2 * size[0]), image.height // (2 * size[1]))
        if factor >= 2:
            image = image.reduce(factor)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W) uint8
        if (pixels.shape[-1], pixels.shape[-2]) != size:
            pixels = F.interpolate(pixels, size=(size[1], size[0]), mode="bicubic", antialias=True)
        mean = torch.tensor(self.image_mean, dtype=torch.float64).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float64).view(3, 1, 1)
        scale_ = (1.0 / (255.0 * std)).float()
        shift = (mean / std).float()
        out = torch.zeros(1, 3, s, s)
        y, x = (s - size[1]) // 2, (s - size[0]) // 2
        out[0, :, y:y + size[1], x:x + size[0]] = pixels[0].float() * scale_ - shift
        return out

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        flat = images if isinstance(images, list) else ([images] if images is not None else [])
        flat = [im for group in flat for im in (group if isinstance(group, list) else [group])]
        placeholders = sum(t.count(IMAGE_TOKEN) for t in texts)
        if placeholders != len(flat):
            raise ValueError(f"{placeholders} {IMAGE_TOKEN} placeholders in the text but {len(flat)} images")
        expanded = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.tokens_per_tile) for t in texts]
        kwargs.pop("add_special_tokens", None)  # the chat template writes them
        return_tensors, truncation = kwargs.pop("return_tensors", None), kwargs.pop("truncation", None)
        # the rest of kwargs is for other modalities (videos, audio) or chat-template bookkeeping
        padding = {name: kwargs.pop(name) for name in PADDING_OPTIONS if name in kwargs}
        encoded = self.tokenizer(expanded, add_special_tokens=False, return_tensors="pt",
                                 **{"padding": True} | padding)
        longest, limit = encoded["input_ids"].shape[1], padding.get("max_length")
        if truncation and limit is not None and longest > limit:  # a cut image would be read as a shorter one
            raise ValueError(f"truncation to max_length={limit} would cut a prompt of {longest} tokens, and each "
                             f"image is {self.tokens_per_tile} tokens that must stay whole; raise max_length or "
                             f"shorten the text")
        data = dict(encoded)
        if flat:
            data["pixel_values"] = torch.cat([self.tile(im) for im in flat])  # (N_images, 3, S, S)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def image_processor(self) -> PipelineImageBatching:
        """What a pipeline reads of an image processor to batch several inputs (`batch_size` > 1)."""
        return PipelineImageBatching()

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]
