"""Batches without padding waste: packed rows (`data.packing=true`) and length-grouped batches for runs that pad.

Packing keeps a batch's samples (so a step sees the same samples, counts and loss as its padded twin) and lays them
into rows by first-fit decreasing. The row width W is the one, from the longest sample up to `model.llm.max_length`,
that costs the least compute: rows x W x (1 + W / A). A row's linear layers cost W, while dense attention kernels
(SDPA and eager, CPUs) compute its whole W x W score matrix whatever the mask; A is the width at which the two cost
the same (vlm.models.packing.attention_break_even: about 1,150 tokens for the tiny preset, 25,000 for a 7B Llama,
unbounded for varlen flash kernels, whose cost does not depend on the row). Small models thus get rows a little wider
than the longest sample, large ones rows as full as they can be. Samples are never split: the processor has already
cut each one to `max_length` (and dropped any whose cut would go through an image), so every image travels whole
with its sample. Position ids restart at each sample; vlm/models/packing.py turns them into block-diagonal causal
attention.

Length grouping (`data.length_group_batches=N`) sorts each window of N batches' worth of decoded samples by length
and hands them out batch by batch, batches in a random order seeded per pass and reader, so a padded batch holds
samples of similar length.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from vlm.data.processor import IGNORE_INDEX, Encoded, image_slots, pad_batch
from vlm.data.shards import SeededReaderStage


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the sample indices of each row, every row's total length <= capacity."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[index] > capacity:
            raise ValueError(f"a sample of {lengths[index]} tokens does not fit a packed row of {capacity}")
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


WIDTH_STEP = 8  # candidate row widths go up by this many tokens


def best_width(lengths: list[int], max_width: int, break_even: float) -> int:
    """The row width, from the longest of `lengths` up to `max_width`, whose packing costs the least compute:
    rows x W x (1 + W / break_even) (see the module docstring)."""
    longest = max(lengths)
    candidates = [longest, *range(longest + WIDTH_STEP, max(longest, max_width) + 1, WIDTH_STEP)]
    return min(candidates, key=lambda width: len(pack_rows(lengths, width)) * width * (1 + width / break_even))


def pack_batch(encoded: list[Encoded], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor | list[int]]:
    """Samples -> packed rows: input_ids, labels, position_ids (R, W), W = `width` (default: the longest sample's
    length), pixel_values and image_slots in packed order, and `order`, the sample indices in that order.

    Each sample's first label is ignored: unpacked it is never predicted (nothing comes before it), and packed, the
    token before it belongs to another sample. The rest of a row is padding: positions 0, 1, ... (a sample of its own
    to the attention mask), no labels."""
    lengths = [len(e.input_ids) for e in encoded]
    width = width or max(lengths)
    rows = pack_rows(lengths, width)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            sample, n = encoded[i], len(encoded[i].input_ids)
            ids[r, start:start + n] = sample.input_ids
            positions[r, start:start + n] = torch.arange(n)
            if sample.labels is not None:
                labels[r, start + 1:start + n] = sample.labels[1:]
            start += n
        positions[r, start:] = torch.arange(width - start)
    order = [i for row in rows for i in row]
    in_order = [encoded[i] for i in order]
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "order": order,
            "pixel_values": torch.cat([e.pixel_values for e in in_order]), "image_slots": image_slots(in_order)}


class LengthGrouping(SeededReaderStage):
    """A pipeline stage: windows of `batches_per_window * batch_size` samples, sorted by `length`, given out a batch
    at a time with the batches of a window in a random order of their own for each pass and reader. The DataLoader
    cuts consecutive `batch_size` samples into a batch, so each batch holds neighbours in length."""

    purpose = "length-groups"

    def __init__(self, batches_per_window: int, batch_size: int, length: Callable[[dict], int], seed: int) -> None:
        super().__init__(seed)
        self.window, self.batch_size, self.length = batches_per_window * batch_size, batch_size, length

    def run_seeded(self, samples: Iterable[dict], rng: random.Random) -> Iterator[dict]:
        buffer: list[dict] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) == self.window:
                yield from _grouped(buffer, self.batch_size, self.length, rng)
                buffer = []
        yield from _grouped(buffer, self.batch_size, self.length, rng)


def _grouped(samples: list[dict], batch_size: int, length: Callable[[dict], int], rng: random.Random) -> Iterator[dict]:
    ordered = sorted(samples, key=length)
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    rng.shuffle(full)
    for batch in full + [b for b in batches if len(b) < batch_size]:  # a short remainder last, as one batch
        yield from batch


@dataclass(frozen=True)
class ConversationCollator:
    """Decoded conversation samples -> a batch: packed rows (`packing`) or padded ones (`padded`, also every held-out
    batch), with each sample's key and tile count in batch order (the feature cache names tiles by them) and a
    held-out sample's turns to answer."""

    pad_id: int
    max_width: int  # the widest packed row (the processor's max_length)
    break_even: float  # the row width at which attention costs as much as the linear layers (see best_width)
    packing: bool

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        if not self.packing:
            return self.padded(samples)
        encoded = [s["encoded"] for s in samples]
        batch = pack_batch(encoded, self.pad_id, best_width([len(e.input_ids) for e in encoded], self.max_width,
                                                             self.break_even))
        return {**batch, **sample_fields([samples[i] for i in batch.pop("order")])}

    def padded(self, samples: list[dict]) -> dict[str, Any]:
        return padded_batch(samples, self.pad_id)


def padded_batch(samples: list[dict], pad_id: int) -> dict[str, Any]:
    """Decoded conversation samples -> a padded batch with their keys and tile counts (and held-out turns)."""
    batch = pad_batch([s["encoded"] for s in samples], pad_id) | sample_fields(samples)
    if samples and "scored" in samples[0]:
        batch["scored"] = [s["scored"] for s in samples]  # per sample: its held-out turns to answer
    return batch


def sample_fields(samples: list[dict]) -> dict[str, Any]:
    return {"num_samples": len(samples), "keys": [s["key"] for s in samples],
            "tiles": [len(s["encoded"].pixel_values) for s in samples]}
