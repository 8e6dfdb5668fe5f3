"""webdataset pipelines: shard lists split by node and worker, tolerant decoding, and counted skips.

Every stage reads shards the same way; only the per-sample `decode` function and the collate differ. A sample that
cannot be decoded (corrupt image, missing caption, malformed JSON, an image-count mismatch) is logged once with its
shard and key and dropped; the number dropped travels inside each batch as `skipped`, so the training loop can count
skips across DataLoader workers and stop when the rate passes `data.max_skip_rate`.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader
from webdataset.shardlists import expand_urls

from vlm.errors import UserError

log = logging.getLogger(__name__)


class SkipSample(Exception):
    """Raised by a decode function for a sample that must be dropped; the message says why."""


class ShardError(UserError, ValueError):
    """A shard pattern that matches nothing, or too few shards for the readers."""


REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://")


def list_shards(pattern: str, key: str = "data.train") -> list[str]:
    """Expand a brace pattern ("a/{000..009}.tar", "pipe:..." or "a.tar::b.tar") and check local files exist."""
    try:
        urls = expand_urls(pattern)
    except ValueError as err:  # braceexpand's UnbalancedBracesError: "{000..009.tar"
        raise ShardError(f"{key}={pattern!r} is not a valid shard pattern ({err}); write ranges as "
                         f"shard-{{000000..000009}}.tar") from None
    local = [u for u in urls if not u.startswith(REMOTE_PREFIXES)]
    missing = [u for u in local if not os.path.exists(u.removeprefix("file:"))]
    if not urls or len(missing) == len(urls):
        raise ShardError(f"{key}={pattern!r} matches no shard file (first expanded path: "
                         f"{urls[0] if urls else 'none'!r}); check the path and the {{000..009}} range")
    if missing:
        raise ShardError(f"{key}={pattern!r}: {len(missing)} of {len(urls)} shards are missing, e.g. {missing[0]!r}")
    if folders := [u for u in local if os.path.isdir(u.removeprefix("file:"))]:
        folder = folders[0].removeprefix("file:")
        if not any(glob.glob(os.path.join(glob.escape(folder), *inside, "*.tar")) for inside in ((), ("train",))):
            raise ShardError(f"{key}={pattern!r}: {folders[0]!r} is a folder with no .tar shard in it (nor in a "
                             f"train/ folder inside); name shard files, e.g. "
                             f"{key}='/data/shard-{{000000..000009}}.tar'")
        raise ShardError(f"{key}={pattern!r}: {folders[0]!r} is a folder; name its shards, e.g. "
                         f"{key}={shard_pattern_hint(folder)!r}")
    warn_unfinished_conversion({os.path.dirname(u.removeprefix("file:")) or "." for u in local}, key)
    return urls


_WARNED_UNFINISHED: set[str] = set()  # folders already warned about: a run lists its shards more than once


def warn_unfinished_conversion(folders: Iterable[str], key: str) -> None:
    """A converter names the shard it is writing NAME.partial until it is whole; one left behind means the run was
    stopped, and the whole shards beside it are only part of the data set. Warns once per folder."""
    for folder in sorted(set(folders) - _WARNED_UNFINISHED):
        _WARNED_UNFINISHED.add(folder)
        if unfinished := sorted(glob.glob(os.path.join(glob.escape(folder), "*.partial"))):
            log.warning("%s: %s holds %s, left by a converter that was stopped before it finished; its shards are "
                        "only part of the data set (rerun the converter with --overwrite to write all of it)",
                        key, folder, os.path.basename(unfinished[0]))


def file_version(path: str) -> str | None:
    """A shard file's resolved path, size and modification time: what tells a shard rewritten in place from the one
    read before. None for a shard that is no local file (a URL, a pipe)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


def absolute_pattern(pattern: str) -> str:
    """A shard pattern that reads the same shards from any folder: its local parts ("a/{0..9}.tar::b.tar") made
    absolute; URLs and pipes stay as they are."""
    parts = pattern.split("::")
    return "::".join(part if part.startswith(REMOTE_PREFIXES) else os.path.abspath(os.path.expanduser(part))
                     for part in parts)


def shard_pattern_hint(folder: str) -> str:
    """A brace pattern over the .tar files in `folder` (or its `train` subfolder, as converters and vlm.constitution
    write them) when their names differ only in a number, else a range for the user to fill in."""
    if not any(name.endswith(".tar") for name in os.listdir(folder)) and os.path.isdir(os.path.join(folder, "train")):
        folder = os.path.join(folder, "train")
    names = sorted(name for name in os.listdir(folder) if name.endswith(".tar"))
    found = [re.fullmatch(r"(.*?)(\d+)\.tar", name) for name in names]
    if names and all(found) and len({(m.group(1), len(m.group(2))) for m in found}) == 1:
        first, last = found[0], found[-1]
        return os.path.join(folder, f"{first.group(1)}{{{first.group(2)}..{last.group(2)}}}.tar")
    return os.path.join(folder, "shard-{000000..000009}.tar")


MAX_SKIP_WARNINGS = 100  # per reader: a shard set of the wrong kind would otherwise log a line per sample


class SkipCount:
    """Samples a rank's readers skipped, counted where they are decoded: one shared-memory slot per DataLoader worker
    (slot 0 without workers), which the training process reads. Skips reach the run's totals whether or not a sample
    that trains follows them, e.g. from a worker whose shards hold no usable sample at all."""

    def __init__(self, readers: int = 1):
        self.slots = torch.zeros(max(1, readers), dtype=torch.int64).share_memory_()  # (readers,)
        self.taken = 0

    def add(self) -> None:
        worker = torch.utils.data.get_worker_info()
        self.slots[0 if worker is None else worker.id] += 1

    def total(self) -> int:
        return int(self.slots.sum())

    def take_new(self) -> int:
        """Skips counted since the last call."""
        total = self.total()
        new, self.taken = total - self.taken, total
        return new


def decode_samples(decode: Callable[[dict], dict],
                   skips: SkipCount | None) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """A pipeline stage applying `decode` to each raw sample; failures are logged once and counted in `skips`."""

    warned: set[tuple[str | None, str | None]] = set()  # per reader; workers persist, so later passes stay quiet

    def stage(source: Iterable[dict]) -> Iterator[dict]:
        for raw in source:
            try:
                sample = decode(raw)
            except Exception as err:  # any bad sample is dropped; the count keeps the run honest
                if skips is not None:
                    skips.add()
                where = (raw.get("__url__"), raw.get("__key__"))
                if where in warned or len(warned) > MAX_SKIP_WARNINGS:
                    continue
                warned.add(where)
                if len(warned) > MAX_SKIP_WARNINGS:
                    log.warning("%d samples skipped in this reader so far, each named above; the skipped samples "
                                "after them are counted (data/skipped) without a line each", MAX_SKIP_WARNINGS)
                else:
                    reason = str(err)
                    named = f"{where[0]}:{where[1]}"  # decoders name it too: "SHARD:KEY: ...", "SHARD:KEY image 0: ..."
                    if reason.startswith(named):
                        reason = reason.removeprefix(named).lstrip(": ")
                    log.warning("skipping sample %s in %s: %s", where[1], where[0], reason)
                continue
            yield sample

    return stage


class UnreadableShards:
    """webdataset's handler for a shard it cannot read (not a tar, cut short): one warning naming the shard and why,
    once per reader, instead of the library's warning with a file object's repr on every pass; reading goes on.

    Drawing shards with replacement (data.resampled) never ends a pass, so the check that a pass gave a batch never
    runs: `max_failures_in_a_row` unreadable shards with no sample between them stop the reader instead. `passing`
    is the pipeline stage after the reader that sees each sample go by."""

    def __init__(self, max_failures_in_a_row: int | None = None) -> None:
        self.max_failures_in_a_row = max_failures_in_a_row
        self.failures_in_a_row = 0
        self.warned: set[str] = set()

    def __call__(self, err: Exception) -> bool:
        url = next((a for a in reversed(err.args) if isinstance(a, str)), "a shard")  # webdataset appends the url
        if url not in self.warned:
            self.warned.add(url)
            reason = err.args[0] if err.args and isinstance(err.args[0], str) and err.args[0] != url else ""
            log.warning("skipping the rest of %s: it cannot be read as a tar file (%s%s); its samples from there on "
                        "are not read", url, type(err).__name__, f": {reason}" if reason else "")
        self.failures_in_a_row += 1
        if self.max_failures_in_a_row and self.failures_in_a_row >= self.max_failures_in_a_row:
            raise ShardError(f"{self.failures_in_a_row} shards drawn in a row could not be read (the last: {url}), "
                             f"with no sample between them; with data.resampled=true they would be drawn forever. "
                             f"Check the shard pattern and the warnings above")
        return True

    def passing(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            self.failures_in_a_row = 0
            yield sample


class SeededReaderStage(wds.PipelineStage):
    """A pipeline stage whose randomness is seeded by (seed + pass, rank, worker), so each pass through the data and
    each reader (rank x DataLoader worker) draws its own. Seed + pass, as webdataset's detshuffle counts: a run
    resumed at an epoch's start gets the next pass's seed as its own (vlm.training.data_position), and so the order
    the uninterrupted run would have read. Workers are persistent, so a worker's stage counts its passes."""

    purpose = "stage"  # names the stream, so two stages of one reader draw independently

    def __init__(self, seed: int) -> None:
        self.seed, self.passes = seed, -1

    def run(self, samples: Iterable[dict]) -> Iterator[dict]:
        self.passes += 1
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"vlm-{self.purpose}/{self.seed + self.passes}/{rank}/{worker}")  # str seeds: stable
        return self.run_seeded(samples, rng)

    def run_seeded(self, samples: Iterable[dict], rng: random.Random) -> Iterator[dict]:
        raise NotImplementedError


class ReaderShuffle(SeededReaderStage):
    """The sample shuffle buffer. Readers of different shards need no seeds of their own, but drawing shards with
    replacement (data.resampled) lets two readers draw the same shard: with one seed they would yield it in one order,
    and the global batch would hold copies of the same samples."""

    purpose = "shuffle"

    def __init__(self, bufsize: int, initial: int, seed: int) -> None:
        super().__init__(seed)
        self.bufsize, self.initial = bufsize, initial

    def run_seeded(self, samples: Iterable[dict], rng: random.Random) -> Iterator[dict]:
        return wds.shuffle(self.bufsize, self.initial, rng=rng)(samples)


def build_pipeline(urls: list[str], decode: Callable[[dict], dict], *, train: bool, resampled: bool = False,
                   shuffle_buffer: int = 1000, seed: int = 0, split_by_node: bool = True,
                   skips: SkipCount | None = None) -> wds.DataPipeline:
    """Shards -> samples -> decoded samples, the ones that fail to decode counted in `skips`. Train pipelines shuffle
    shards and samples; eval pipelines do not."""
    if resampled:
        shards: list = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        shards = [wds.SimpleShardList(urls)]
        if train:
            shards.append(wds.detshuffle(bufsize=len(urls), seed=seed))
        if split_by_node:
            shards.append(wds.split_by_node)
        shards.append(wds.split_by_worker)
    unreadable = UnreadableShards(2 * len(urls) + 8 if resampled else None)  # a pass ends otherwise (EmptyPassGuard)
    stages = [*shards, wds.tarfile_to_samples(handler=unreadable), unreadable.passing]
    if train and shuffle_buffer > 1:
        # seeded, so two runs with the same config see the same batches (resume reseeds it per epoch)
        stages.append(ReaderShuffle(shuffle_buffer, initial=min(shuffle_buffer, 256), seed=seed))
    stages.append(decode_samples(decode, skips))
    return wds.DataPipeline(*stages)


def reader_plan(num_shards: int, num_workers: int, world_size: int, pattern: str, resampled: bool) -> int:
    """How many DataLoader workers to use so that every reader gets at least one shard.

    Each rank x worker reads a disjoint subset of shards; a reader with none would end its epoch at once while the
    others still train, which stalls DDP. Returns the worker count to use, or raises naming the numbers and the fix.
    """
    if resampled:
        return num_workers
    if num_shards < world_size:
        raise ShardError(f"{pattern!r} has {num_shards} shards for {world_size} ranks: every rank needs at least "
                         f"one. Write more, smaller shards (e.g. {world_size * max(1, num_workers)}), or set "
                         f"data.resampled=true to draw shards with replacement")
    if num_shards % world_size:
        log.warning("%r has %d shards for %d ranks: some ranks read %d and others %d, so the ones with fewer start "
                    "their next pass early and their samples count more; a multiple of %d shards reads every sample "
                    "once per epoch", pattern, num_shards, world_size, num_shards // world_size + 1,
                    num_shards // world_size, world_size)
    readers = world_size * max(1, num_workers)
    if num_shards < readers:
        fitted = num_shards // world_size
        log.warning("%r has %d shards for %d ranks x %d workers = %d readers; using data.num_workers=%d. Write at "
                    "least %d shards, or set data.resampled=true, to use every worker", pattern, num_shards,
                    world_size, num_workers, readers, fitted, readers)
        return fitted
    return num_workers


def make_loader(pipeline: wds.DataPipeline, batch_size: int, num_workers: int,
                collate: Callable[[list[dict]], dict[str, Any]], drop_last: bool) -> DataLoader:
    # a webdataset pipeline is an IterableDataset: each DataLoader worker iterates its own split
    return DataLoader(pipeline, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      drop_last=drop_last, persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if num_workers > 0 else None)
