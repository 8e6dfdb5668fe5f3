"""The processor: tiler + tokenizer + chat template -> model inputs and labels. Training, eval, infer and serve all
go through it, so an image costs the same tokens everywhere.

A conversation is a list of {"role", "content"} messages whose text holds `<image>` placeholders (any number, in any
turn). The chat template renders it; each placeholder becomes `num_tokens` image-token ids, where `num_tokens` is what
the tiler reports for that image; labels keep the assistant turns only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PreTrainedTokenizerBase

from vlm.data.chat_template import ChatTemplate, SampleError
from vlm.data.tiler import ImageLoadError, TiledImage, Tiler
from vlm.data.tokenizer import IMAGE_TOKEN, image_token_id

IGNORE_INDEX = -100
ImageSource = str | bytes | Image.Image | TiledImage  # TiledImage: tiled already, used as it is
PROMPT_NAME = "request"  # how errors name a prompt being answered: "request image 0: ..."


class PromptTooLong(SampleError):
    """A prompt longer than the model's context (a chat forgets its oldest turns on this one); `tokens` long."""

    def __init__(self, message: str, tokens: int):
        super().__init__(message)
        self.tokens = tokens


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (L,) with num_tokens image ids per <image>
    labels: torch.Tensor | None  # (L,) IGNORE_INDEX outside assistant turns; None for prompts
    pixel_values: torch.Tensor  # (N_tiles, 3, S, S), tiles of every image in order
    image_tokens: list[int]  # image tokens per image


def image_label(name: str, index: int, image: ImageSource) -> str:
    """How errors name an image: its sample and place, and its file when it has one."""
    return f"{name} image {index}" + (f" ({os.fspath(image)!r})" if isinstance(image, str | os.PathLike) else "")


class Processor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, tiler: Tiler, max_length: int):
        self.tokenizer = tokenizer
        self.tiler = tiler
        self.max_length = max_length
        self.image_token_id = image_token_id(tokenizer)
        self.template = ChatTemplate(tokenizer)

    def encode(self, messages: list[dict[str, str]], images: list[ImageSource], name: str = "sample",
               add_generation_prompt: bool = False, train: bool = True, last_reply_only: bool = False) -> Encoded:
        """Encode a conversation; raises SampleError (naming `name`) for anything that would train wrongly.
        Labels keep every assistant reply, or with `last_reply_only` the last one (a preference pair's answer)."""
        self._check(messages, images, name, train)
        tiled = self.tile_all(images, name)
        text = self.template.render(messages, add_generation_prompt=add_generation_prompt, name=name)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=train)
        ids = encoding["input_ids"]
        keep = [False] * len(ids)
        if train:
            spans = self.template.assistant_spans(messages, text, name)
            spans = spans[-1:] if last_reply_only else spans
            keep = [any(s <= start < e for s, e in spans) and end > start
                    for start, end in encoding["offset_mapping"]]
        out_ids, out_labels, image_ends = self._expand_images(ids, keep, tiled, name)
        if len(out_ids) > self.max_length:
            if not train:  # a prompt cut short would lose the question and the generation prompt
                raise PromptTooLong(f"{name}: the prompt is {len(out_ids)} tokens, more than the model's context of "
                                    f"{self.max_length}; shorten it or use fewer or smaller images", len(out_ids))
            # cut at the context, or before the first image that does not fit whole: images are never cut
            whole = sum(end <= self.max_length for end in image_ends)
            starts_within = whole < len(tiled) and image_ends[whole] - tiled[whole].num_tokens < self.max_length
            cut = image_ends[whole] - tiled[whole].num_tokens if starts_within else self.max_length
            length, out_ids, out_labels, tiled = len(out_ids), out_ids[:cut], out_labels[:cut], tiled[:whole]
            if all(label == IGNORE_INDEX for label in out_labels):
                where = f"before image {whole}, which does not fit whole," if starts_within else "at the context"
                raise SampleError(f"{name}: {length} tokens exceed model.llm.max_length={self.max_length}, and "
                                  f"cutting {where} leaves no assistant tokens; sample dropped")
        if train and all(label == IGNORE_INDEX for label in out_labels):
            raise SampleError(f"{name}: no assistant tokens to learn from")
        pixels = torch.cat([t.pixel_values for t in tiled]) if tiled else torch.zeros(0, 3, self.tiler.tile_size,
                                                                                        self.tiler.tile_size)
        return Encoded(torch.tensor(out_ids), torch.tensor(out_labels) if train else None, pixels,
                       [t.num_tokens for t in tiled])

    def _check(self, messages: list[dict[str, str]], images: list[ImageSource], name: str, train: bool) -> None:
        """What makes a conversation unusable before it is rendered: placeholders and images that disagree, text that
        spells a control token, and for training no (or an empty) assistant turn."""
        placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        if placeholders != len(images):
            raise SampleError(f"{name}: {placeholders} {IMAGE_TOKEN} placeholder{'s' * (placeholders != 1)} but "
                              f"{len(images)} image{'s' * (len(images) != 1)}")
        for i, message in enumerate(messages):
            if problem := self.template.control_problem(message["content"], f"{name}: message {i} ({message['role']})"):
                raise SampleError(problem)
        if train:
            if not any(m["role"] == "assistant" for m in messages):
                raise SampleError(f"{name}: no assistant turn to learn from or to score")
            if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
                raise SampleError(f"{name}: empty assistant turn")

    def _expand_images(self, ids: list[int], keep: list[bool], tiled: list[TiledImage],
                       name: str) -> tuple[list[int], list[int], list[int]]:
        """Each <image> id becomes its image's run of image tokens (never learned): -> (ids, labels, the end of
        each image's run)."""
        out_ids: list[int] = []
        out_labels: list[int] = []
        image_ends: list[int] = []
        for token, learn in zip(ids, keep, strict=True):
            if token == self.image_token_id:
                if len(image_ends) >= len(tiled):
                    raise SampleError(f"{name}: the text has more {IMAGE_TOKEN} tokens than images")
                count = tiled[len(image_ends)].num_tokens
                out_ids += [token] * count
                out_labels += [IGNORE_INDEX] * count
                image_ends.append(len(out_ids))
            else:
                out_ids.append(token)
                out_labels.append(token if learn else IGNORE_INDEX)
        if len(image_ends) != len(tiled):
            raise SampleError(f"{name}: {len(tiled)} images but the rendered text holds {len(image_ends)} "
                              f"{IMAGE_TOKEN}")
        return out_ids, out_labels, image_ends

    def tile_all(self, images: list[ImageSource], name: str = "sample", first_index: int = 0) -> list[TiledImage]:
        """Each image tiled once, for a sample encoded several times (a pair's two answers, each held-out turn, a
        chat's later turns); errors count the images from `first_index`."""
        return [self._tile(image, name, first_index + i) for i, image in enumerate(images)]

    def _tile(self, image: ImageSource, name: str, index: int) -> TiledImage:
        if isinstance(image, TiledImage):
            return image
        try:
            return self.tiler(image, name=image_label(name, index, image))
        except ImageLoadError as err:
            err.image_index = index  # which of the sample's images (a server names its request field)
            raise

    def prompt(self, messages: list[dict[str, str]], images: list[ImageSource], name: str = PROMPT_NAME) -> Encoded:
        """Encode a conversation for generation: the reply starts right after."""
        return self.encode(messages, images, name=name, add_generation_prompt=True, train=False)


def image_slots(encoded: list[Encoded]) -> torch.Tensor:
    """(N_image_tokens,) the position of each image token's image within its sample: 0 for the first image, ..."""
    slots = [torch.full((n,), k, dtype=torch.long) for e in encoded for k, n in enumerate(e.image_tokens)]
    return torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)


def run_slots(is_image: torch.Tensor) -> torch.Tensor:
    """(N_image_tokens,) each image token's image within its row, counting each run of image tokens (B, L) bool as
    one image: `image_slots` for a prompt whose images are written apart."""
    starts = is_image & ~F.pad(is_image, (1, 0))[:, :-1]  # (B, L) the first token of each run
    return (starts.cumsum(dim=1) - 1)[is_image]


def pad_batch(encoded: list[Encoded], pad_id: int, left: bool = False,
              tiles_of: list[Encoded] | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence -> input_ids (B, L), attention_mask (B, L), labels (B, L), pixel_values (the
    tiles of `tiles_of`, by default of every row), image_slots."""
    length = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        span = slice(length - n, length) if left else slice(0, n)
        ids[row, span], mask[row, span] = e.input_ids, 1
        if e.labels is not None:
            labels[row, span] = e.labels
    batch = {"input_ids": ids, "attention_mask": mask, "image_slots": image_slots(encoded),
             "pixel_values": torch.cat([e.pixel_values for e in tiles_of or encoded])}
    if any(e.labels is not None for e in encoded):
        batch["labels"] = labels
    return batch
