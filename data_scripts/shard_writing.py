"""What every converter shares: image checks, the train/val split, the shard-writing loop, skip reports and summary.

A converter turns the user's file into a list of `Job`s (one per record) and a `build(record) -> fields` function
that returns the sample's fields or raises `Skip` with a reason. `write_shards` runs `build` over the jobs (in a few
threads: image checks are I/O and decoding), writes the good samples to OUT/train and OUT/val as
`shard-000000.tar ...`, reports every skipped record with where it is in the user's file, and `report` prints the
summary and the brace patterns to pass as `data.train=` / `data.val=`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shlex
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from vlm.data.shard_writer import ShardSplitWriter, shard_pattern
from vlm.errors import json_type

T = TypeVar("T")
R = TypeVar("R")

MAX_PRINTED_SKIPS = 20  # past this, skips are only counted on screen; skipped.txt lists them all
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
# Modes Pillow can write as PNG; anything else (CMYK, F, YCbCr, ...) is converted before re-encoding.
_PNG_MODES = ("1", "L", "LA", "I;16", "I;16B", "P", "RGB", "RGBA")


class DataError(Exception):
    """A problem with the input as a whole (a missing column, an unreadable annotation file): the run stops."""


class Skip(Exception):
    """One record cannot be converted. `kind` groups it in the summary; the message says what is wrong with it."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def read_text_keeping_bad_bytes(path: Path) -> str:
    """A text file decoded as UTF-8 (a leading byte-order mark dropped, as spreadsheets write one), with bytes of
    another encoding (a Latin-1 line, a cut-off character) kept as lone surrogates, so that only the records holding
    them are refused (`utf8`), each with its line. Raises OSError as reading does."""
    return path.read_bytes().decode("utf-8-sig", errors="surrogateescape")


def text_lines(text: str) -> list[str]:
    """A file's lines, split at newlines only: str.splitlines also splits at U+2028, U+2029 and U+0085, which JSON
    strings may hold raw, so a JSONL record holding one was cut in two and both halves refused."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def utf8(text: str, what: str) -> bytes:
    """`text` as UTF-8 to store; raises Skip for text that has no UTF-8 form: bytes of another encoding in the input
    file (read as lone surrogates) or a lone surrogate escape ("\\ud800") in its JSON."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        context = text[max(0, err.start - 30): err.start].encode("utf-8", "replace").decode()
        raise Skip("not UTF-8", f"{what} holds text that is not valid UTF-8 after {context!r}: bytes of another "
                                f"encoding (save the file as UTF-8) or a lone surrogate escape") from None


class _KeysRepeated(dict):
    """A JSON object that names some keys more than once (`repeated`); json keeps each one's last value."""

    repeated: list[str]


def _json_object(pairs: list[tuple[str, Any]]) -> dict:
    whole = dict(pairs)
    if len(whole) == len(pairs):
        return whole
    names = [name for name, _ in pairs]
    marked = _KeysRepeated(whole)
    marked.repeated = [name for name in whole if names.count(name) > 1]
    return marked


def load_json(text: str) -> Any:
    """json.loads, marking each object that names a key twice, which json would read as its last value alone, so
    that `repeated_keys` can refuse the record rather than convert half of what it says."""
    return json.loads(text, object_pairs_hook=_json_object)


def repeated_keys(value: Any) -> str:
    """Why a value read by `load_json` is ambiguous: the keys an object in it names twice ("" when none)."""
    if isinstance(value, _KeysRepeated):
        return f"names {', '.join(map(repr, value.repeated))} more than once (which one is meant?)"
    inner = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((problem for item in inner if (problem := repeated_keys(item))), "")


def text_field(record: dict, name: str) -> str | None:
    """record[name] as text, None when absent or null; any other type (a list, a number) is a bad record rather
    than its Python repr written out as text."""
    value = record.get(name)
    if value is None or isinstance(value, str):
        return value
    raise Skip("bad record", f"{name!r} must be a string, got {json_type(value)}")


# ---- images ----------------------------------------------------------------------------------------------------

# formats stored byte-for-byte, by the media type their bytes' signature gives: their shard extension
STORED_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}


def _reencode_png(data: bytes) -> bytes:
    """BMP, TIFF, GIF, ... -> PNG (first frame), with EXIF rotation applied because PNGs written here carry none."""
    with Image.open(io.BytesIO(data)) as im:
        image = ImageOps.exif_transpose(im)
    if image.mode in ("I", "I;16L", "I;16N"):  # 16-bit pixels in a 32-bit or native-order mode (PGM, TIFF): kept
        # 16-bit, for the tiler to scale as it does at chat time; convert("RGB") would clip all above 255 to white
        image = Image.fromarray(np.clip(np.asarray(image), 0, 65535).astype(np.uint16))  # (H, W) -> I;16
    if image.mode not in _PNG_MODES:
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        try:
            image = image.convert("RGBA" if has_alpha else "RGB")
        except ValueError:  # modes with no direct RGB conversion (e.g. 32-bit float) go through L
            image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


_checker: Any = None  # vlm's Tiler, built on first use: importing it loads torch, which `--help` need not wait for


def read_image(path: Path) -> tuple[str, bytes]:
    """Check that `path` is an image training can decode; return (shard extension, bytes to store).

    JPEG, PNG and WebP are stored unchanged (as jpg/png/webp, whatever the file name says); other formats are
    re-encoded to PNG. The check is PIL's `verify()` (file structure) and then a decode through vlm's own tiler, so
    truncated pixel data, over-size images and odd modes are refused here exactly as training would refuse them.
    """
    global _checker
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Skip("image not found", f"image file not found: {path}") from None
    except OSError as err:
        raise Skip("unreadable image", f"cannot read image file {path}: {err.strerror or err}") from None
    if not data:
        raise Skip("unreadable image", f"image file is empty (0 bytes): {path}")
    from vlm.data.tiler import ImageLoadError, Tiler, TilerConfig, pil_bomb_limit, sniff_media_type

    if _checker is None:
        _checker = Tiler(TilerConfig(max_tiles=1), tile_size=16, tokens_per_tile=1)  # tiny tiles: a cheap decode
    try:
        with pil_bomb_limit(_checker.config.max_pixels), Image.open(io.BytesIO(data)) as im:  # the trainer's limit
            im.verify()
    except Image.DecompressionBombError:
        pass  # far over the trainer's limit: the tiler below says so in its words
    except UnidentifiedImageError:
        raise Skip("unreadable image", f"not an image file (no format PIL can read): {path}") from None
    except Exception as err:  # PIL raises many types for broken files
        raise Skip("unreadable image", f"not a readable image: {path} ({err})") from None
    try:
        _checker(data, name=str(path))
    except ImageLoadError as err:
        raise Skip("unreadable image", str(err)) from None
    extension = STORED_EXTENSIONS.get(sniff_media_type(data))  # from the bytes, not the file's name
    if extension is not None:
        return extension, data
    try:
        return "png", _reencode_png(data)
    except Exception as err:
        raise Skip("unreadable image", f"cannot re-encode {path} as PNG ({err})") from None


# ---- planning --------------------------------------------------------------------------------------------------

@dataclass
class Job(Generic[T]):
    """One input record on its way to a shard."""

    key: str  # the sample's __key__: the record's position in the input, zero-padded
    where: str  # how the user finds the record in their file, for messages: "line 12", "record 5 (id 'abc')"
    split: str  # "train" or "val"
    record: T


def split_names(count: int, val_fraction: float, seed: int, groups: Sequence[str] | None = None) -> list[str]:
    """The split of each of `count` records: a seeded sample of round(count * val_fraction) go to "val". With
    `groups` (one key per record, e.g. its image), whole groups are drawn instead, round(groups * val_fraction) of
    them, so the records of one image never sit on both sides of the split.

    The choice depends only on the count (or the groups), the fraction and the seed, never on which images turn out to
    be broken, so re-running a conversion after fixing files keeps every record in its split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be at least 0 and below 1, got {val_fraction}")
    keys = list(groups) if groups is not None else list(range(count))
    distinct = list(dict.fromkeys(keys))  # in first-seen order
    # a requested val split is never empty and train never is; a single group always trains
    n = len(distinct)
    wanted = min(max(round(n * val_fraction), 1), n - 1) if val_fraction > 0 and n >= 2 else 0
    chosen = {distinct[i] for i in random.Random(seed).sample(range(n), wanted)}
    return ["val" if key in chosen else "train" for key in keys]


def image_group(images: Path, name: str | None, where: str) -> str:
    """What keeps a record in its image's split (`plan_jobs`'s `group`): the image's absolute, normalised path under
    `images` (a record may name it relatively or absolutely), or for a record without one, its own place `where`."""
    return os.path.normpath(os.path.abspath(images / name.strip())) if name and name.strip() else where


def joined_groups(keys: Sequence[Sequence[str]]) -> list[str]:
    """One group per record from its keys (its images, at least one): records that share a key join one group, and
    so do their other keys' records, transitively (union-find). A group is named by its smallest key."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for record_keys in keys:
        for other in record_keys[1:]:
            a, b = root(record_keys[0]), root(other)
            parent[max(a, b)] = min(a, b)
    return [root(record_keys[0]) for record_keys in keys]


def plan_jobs(records: Sequence[T], where: Callable[[int, T], str], val_fraction: float, seed: int,
              shuffle: bool, group: Callable[[int, T], str | Sequence[str]] | None = None) -> list[Job[T]]:
    """Jobs in writing order. Train records are shuffled (seeded) unless `shuffle` is off, because annotation files
    are often sorted by class and the trainer's shuffle buffer only mixes samples that are near each other. `group`:
    a record's key, or keys (its images); records that share one land in the same split, so no held-out record
    shows an image a train record shows."""
    groups = None
    if group is not None:
        keys = [group(i, r) for i, r in enumerate(records)]
        groups = joined_groups([[k] if isinstance(k, str) else k for k in keys])
    splits = split_names(len(records), val_fraction, seed, groups)
    if val_fraction > 0 and groups is not None and len(records) >= 2 and "val" not in splits:
        print(f"note: --val-fraction {val_fraction:g} holds out no record: all {len(records)} share images, directly "
              f"or through each other, and one image's records stay on one side; no val split is written")
    width = max(8, len(str(max(len(records) - 1, 0))))
    jobs = [Job(f"{i:0{width}d}", where(i, r), s, r) for i, (r, s) in enumerate(zip(records, splits, strict=True))]
    if shuffle:
        train = [j for j in jobs if j.split == "train"]
        random.Random(seed + 1).shuffle(train)
        jobs = train + [j for j in jobs if j.split == "val"]
    return jobs


SPLITS = ("train", "val")  # every split a converter writes; --overwrite clears them all, not just this run's


def prepare_output(out: Path, splits: Iterable[str], overwrite: bool) -> None:
    """Create OUT/<split>; refuse to mix with what an earlier run wrote unless `overwrite`, then delete all of it:
    the shards and classnames.txt of every split (also of a split this run does not write, which would otherwise
    hold stale samples) and OUT/skipped.txt."""
    splits = list(splits)
    every = [*SPLITS, *(split for split in splits if split not in SPLITS)]
    for path in (out, *(out / split for split in every)):
        if path.exists() and not path.is_dir():
            raise DataError(f"--out {out} is a file, not a folder; choose another --out" if path == out else
                            f"{path} is a file, not a folder; move it or choose another --out")
    old = {split: sorted((out / split).glob("shard-*.tar*")) for split in every}  # .partial: an interrupted run
    if any(old.values()) and not overwrite:
        split, shards = next((split, shards) for split, shards in old.items() if shards)
        raise DataError(f"{out / split} already holds {len(shards)} shard(s) from an earlier run; pass --overwrite to "
                        f"replace them, or choose another --out")
    if overwrite:
        for split, shards in old.items():
            for path in [*shards, out / split / "classnames.txt"]:
                path.unlink(missing_ok=True)
            if split not in splits and (out / split).is_dir() and not any((out / split).iterdir()):
                (out / split).rmdir()  # a split of the earlier run that this one does not write
        (out / "skipped.txt").unlink(missing_ok=True)
    for split in splits:
        try:
            (out / split).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"cannot create the output folder {out / split}: {err.strerror or err}") from None


# ---- writing ---------------------------------------------------------------------------------------------------

def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in input order, computing up to 4 x `workers` results ahead in threads."""
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    # torch (under the image check's tiler, and webdataset) is imported here, before any thread: a first import in
    # a worker while the main thread imports it too fails in torch's circular imports, or crashes the interpreter
    import webdataset  # noqa: F401

    import vlm.data.tiler  # noqa: F401

    with ThreadPoolExecutor(workers) as pool:
        window: deque = deque()
        for item in items:
            window.append((item, pool.submit(fn, item)))
            if len(window) >= 4 * workers:  # bounded look-ahead: memory stays flat on million-record inputs
                first, future = window.popleft()
                yield first, future.result()
        while window:
            first, future = window.popleft()
            yield first, future.result()


PLAIN_LINES_PER_RUN = 20  # in a log file, a progress line every 5% of the records, as training's PlainProgress does
PLAIN_LINE_SECONDS = 15.0  # ... or after this long without one, whichever comes first


class _Progress:
    """tqdm's bar on a terminal. When stderr is a log file (SLURM, CI, `> convert.log`), where the bar is off, a plain
    line every 5% of the records or every 15 s: done/total, percentage, rate, time left, skips so far."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc = total, desc
        self.bar = tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True) if sys.stderr.isatty() else None
        self.done = self.skipped = 0
        self.every = max(1, total // PLAIN_LINES_PER_RUN)
        self.started = self.last_line = time.monotonic()

    def update(self, skipped: bool) -> None:
        self.done += 1
        self.skipped += skipped
        if self.bar is not None:
            self.bar.update()
            return
        now = time.monotonic()
        if self.done % self.every and self.done != self.total and now - self.last_line < PLAIN_LINE_SECONDS:
            return
        self.last_line = now
        rate = self.done / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate
        print(f"{self.desc}: {self.done}/{self.total} ({self.done / max(self.total, 1):.0%}), {rate:.1f} records/s, "
              f"{left:.0f} s left, {self.skipped} skipped", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class SplitResult:
    name: str
    directory: Path
    samples: int
    shards: int

    @property
    def pattern(self) -> str:
        return shard_pattern(self.directory, self.shards)


@dataclass
class Result:
    out: Path
    splits: dict[str, SplitResult]
    skipped: Counter = field(default_factory=Counter)  # kind -> count

    @property
    def written(self) -> int:
        return sum(s.samples for s in self.splits.values())


def _attempt(build: Callable[[T], dict[str, Any]]) -> Callable[[Job[T]], dict[str, Any] | Skip]:
    def run(job: Job[T]) -> dict[str, Any] | Skip:
        try:
            return build(job.record)
        except Skip as skip:
            return skip

    return run


def write_shards(out: Path, jobs: Sequence[Job[T]], build: Callable[[T], dict[str, Any]], *, samples_per_shard: int,
                 workers: int = DEFAULT_WORKERS, desc: str = "converting") -> Result:
    """Build every job's sample and write it to OUT/<split>/shard-*.tar; skipped records are reported as they come
    (to stderr, the first MAX_PRINTED_SKIPS of them) and all listed in OUT/skipped.txt."""
    check_output_arguments(samples_per_shard)
    splits = sorted({job.split for job in jobs}, key=["train", "val"].index)
    writers = {split: ShardSplitWriter(out / split, samples_per_shard) for split in splits}
    skipped: Counter = Counter()
    skip_lines: list[tuple[str, str]] = []  # (key, message): skipped.txt lists them in input order
    progress = _Progress(len(jobs), desc)
    finished = False
    try:
        for job, outcome in ordered_map(_attempt(build), jobs, workers):
            if isinstance(outcome, Skip):
                skipped[outcome.kind] += 1
                skip_lines.append((job.key, f"{job.where}: {outcome}"))
                if len(skip_lines) <= MAX_PRINTED_SKIPS:
                    tqdm.write(f"skipped {skip_lines[-1][1]}", file=sys.stderr)
                elif len(skip_lines) == MAX_PRINTED_SKIPS + 1:
                    tqdm.write(f"(more skips are only counted now; {out / 'skipped.txt'} will list them all)",
                               file=sys.stderr)
            else:
                writers[job.split].write({"__key__": job.key, **outcome})
            progress.update(isinstance(outcome, Skip))
        finished = True
    finally:
        progress.close()
        for writer in writers.values():
            writer.close(whole=finished)
    log = out / "skipped.txt"
    if skip_lines:
        # a path or label read from bytes of another encoding is written with those bytes escaped
        log.write_text("".join(f"{line}\n" for _, line in sorted(skip_lines)), encoding="utf-8",
                       errors="backslashreplace")
    elif log.is_file():
        log.unlink()  # from an earlier run; this one skipped nothing
    results = {}
    for split, writer in writers.items():
        results[split] = SplitResult(split, writer.directory, writer.samples, writer.shards())
    return Result(out, results, skipped)


def write_classnames(directories: Iterable[Path], names: Sequence[str]) -> None:
    """classnames.txt beside the shards: the trainer reads it from beside data.val for zero-shot accuracy."""
    for directory in directories:
        (directory / "classnames.txt").write_text("".join(f"{name}\n" for name in names))


def override(key: str, pattern: str) -> str:
    """`key='pattern'` quoted for Hydra (its grammar rejects a bare `{`) and then for the shell (which would expand
    the braces itself), ready to paste into a command line."""
    if not any(c in pattern for c in "'\"\\$`!"):
        return f"\"{key}='{pattern}'\""
    escaped = pattern.replace("\\", "\\\\").replace("'", "\\'")
    return shlex.quote(f"{key}='{escaped}'")


def report(result: Result, use: str) -> int:
    """Print the summary and the data.train= / data.val= patterns; return the exit code: 2 when nothing was written,
    since the input held no usable record.

    `use` is the vlm command the data suits ("python -m vlm.train stage=sft"), for the example command line.
    """
    total_skipped = sum(result.skipped.values())
    if total_skipped:
        reasons = ", ".join(f"{kind} ({count})" for kind, count in sorted(result.skipped.items(),
                                                                          key=lambda kc: (-kc[1], kc[0])))
        print(f"skipped {total_skipped} record(s): {reasons}; all are listed in {result.out / 'skipped.txt'}")
    if result.written == 0:
        print(f"error: no sample was written to {result.out}: every record was skipped (reasons above)",
              file=sys.stderr)
        return 2
    print(f"wrote {result.written} sample(s) to {result.out}")
    args = []
    for split in result.splits.values():
        if split.samples == 0:
            print(f"  {split.name}: no sample (all of its records were skipped)")
            continue
        args.append(override(f"data.{split.name}", split.pattern))
        print(f"  {split.name}: {split.samples} sample(s) in {split.shards} shard(s): {args[-1]}")
    train = result.splits.get("train")
    if train is not None and 0 < train.shards < 8 and "vlm.train" in use:  # readers of a training run
        print(f"note: train has {train.shards} shard(s); each GPU x DataLoader worker reads whole shards, so the "
              f"trainer will use at most {train.shards} reader(s). Lower --samples-per-shard for more shards.")
    print(f"{'train on them' if 'vlm.train' in use else 'use them'} with:\n  {use} " + " ".join(args))
    return 0


def add_output_arguments(parser: argparse.ArgumentParser, unit: str) -> None:
    """The options both converters share: where shards go, how they are split, shuffled and written."""
    parser.add_argument("--out", metavar="DIR", type=Path, required=True,
                        help="output folder; shards go to OUT/train and OUT/val")
    parser.add_argument("--samples-per-shard", metavar="N", type=int, default=1000,
                        help="samples per .tar (default: 1000)")
    parser.add_argument("--val-fraction", metavar="F", type=float, default=0.0,
                        help=f"fraction held out in OUT/val, drawn by image: of the groups of {unit} that share "
                             f"images (one image's {unit} stay on one side), so the share of {unit} may differ "
                             f"(default: 0, no val split)")
    parser.add_argument("--seed", metavar="S", type=int, default=0,
                        help="seed of the train/val split and train order (default: 0)")


def add_run_arguments(parser: argparse.ArgumentParser, order: str) -> None:
    parser.add_argument("--no-shuffle", action="store_true",
                        help=f"keep the {order} order in the train shards (default: seeded shuffle)")
    parser.add_argument("--workers", metavar="N", type=int, default=DEFAULT_WORKERS,
                        help=f"threads reading and checking images (default: {DEFAULT_WORKERS})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what an earlier converter run left in OUT: the shards of every split, and "
                             "the classnames.txt (images_to_shards) and skipped.txt it wrote")


def check_output_arguments(samples_per_shard: int, val_fraction: float = 0.0) -> None:
    """The shared options' values, checked before anything is read or any folder is made."""
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be at least 0 and below 1, got {val_fraction}")


def run(convert: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a converter; a bad option value or a problem with the input as a whole is one `error:` line and exit
    code 2, given before OUT is touched."""
    try:
        check_output_arguments(args.samples_per_shard, args.val_fraction)
        return convert(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return stopped_by_ctrl_c(args.out)


def stopped_by_ctrl_c(out: Path) -> int:
    """Say what a converter stopped by Ctrl-C leaves in OUT; returns the exit code, 130 (128 + SIGINT)."""
    print(f"\nstopped: the shards in {out} are whole but the set is not (the one being written is left as "
          f"*.partial); rerun with --overwrite to write it all", file=sys.stderr)
    return 130
