"""The output folder: one shard per `prompts_per_shard` prompts, each whole or absent (written under a temporary name,
then renamed, with its counts beside it), so a rerun skips what is done; and the settings the shards were made with,
so a rerun that would make different pairs is refused rather than mixed in."""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlm.config import ConfigError
from vlm.constitution.critics import CriticUnreachable, Item
from vlm.constitution.pairs import Counts, PairMaker, read_prompts
from vlm.constitution.settings import Constitution, ConstitutionConfig
from vlm.data.shard_writer import shard_pattern
from vlm.data.shards import absolute_pattern, file_version, list_shards
from vlm.errors import UserError

log = logging.getLogger(__name__)


def write_atomic_shard(path: Path, samples: list[dict[str, Any]], counts: Counts, first_key: int) -> None:
    """The shard, then its counts beside it, each under a temporary name renamed into place: a shard is whole or
    absent, and the counts file (written last) marks its prompts as done."""
    import webdataset as wds

    partial = path.with_name(path.name + ".partial")
    with wds.TarWriter(str(partial)) as sink:
        for i, sample in enumerate(samples):
            sink.write({"__key__": f"{first_key + i:09d}", **sample})
    os.replace(partial, path)
    counts_file = path.with_suffix(".json")
    partial = counts_file.with_name(counts_file.name + ".partial")
    partial.write_text(json.dumps(vars(counts)) + "\n")
    os.replace(partial, counts_file)


def batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def sampling_seed(seed: int, split: str, shard: int, batch: int) -> int:
    """The policy's sampling seed for one batch: its own per split, shard and batch, so a resumed shard draws the same
    answers, and held-out prompts never replay the train prompts' draws."""
    return zlib.crc32(f"{seed}:{split}:{shard}:{batch}".encode())


def make_split(name: str, pattern: str, limit: int | None, directory: Path, make: PairMaker,
               config: ConstitutionConfig, total: int | None) -> tuple[str, Counts]:
    """Pairs for one split, a shard per `prompts_per_shard` prompts; shards already written are skipped."""
    directory.mkdir(parents=True, exist_ok=True)
    counts, resumed = Counts(), 0
    items = read_prompts(pattern, f"data.{name}")
    wanted = min(x for x in (limit, total) if x is not None) if (limit, total) != (None, None) else None
    if limit is not None:
        items = (item for i, item in zip(range(limit), items, strict=False))
    shards = 0
    with tqdm(total=wanted, desc=f"{name} prompts", unit="prompt", dynamic_ncols=True, disable=None) as bar:
        for index, chunk in enumerate(batches(items, config.prompts_per_shard)):
            path, shards = directory / f"shard-{index:06d}.tar", index + 1
            if path.is_file() and path.with_suffix(".json").is_file():
                recorded = Counts(**json.loads(path.with_suffix(".json").read_text()))
                if recorded.prompts == len(chunk) and not recorded.critic_failed:  # it holds these prompts, all asked
                    counts.add(recorded)
                    resumed += len(chunk)
                    bar.update(len(chunk))
                    continue
                if recorded.prompts == len(chunk):
                    log.info("%s: shard %d lost prompts to %d failed critic requests in an earlier run: asking its "
                             "prompts again", name, index, recorded.critic_failed)
                else:
                    why = ("an earlier run stopped there" if recorded.prompts < len(chunk) else
                           "an earlier run asked for more prompts")
                    log.info("%s: shard %d holds %d prompts where this run asks %d (%s): making it again", name, index,
                             recorded.prompts, len(chunk), why)
            samples, done, failed_before = [], Counts(), make.critic.failed
            for b, batch in enumerate(batches(iter(chunk), config.batch_size)):
                try:
                    made, batch_counts = make(batch, sampling_seed(config.seed, name, index, b), name == "train")
                except UserError as err:  # a critic that was away needs only a rerun; anything else a fix first
                    rerun = ": rerun the same command to go on from there" if isinstance(err, CriticUnreachable) else ""
                    raise UserError(f"{err}; {counts.prompts} {name} prompts were done and are kept in "
                                    f"{directory}{rerun}") from None
                except KeyboardInterrupt:
                    bar.close()
                    log.warning("stopped: %d %s prompts were done and are kept in %s; rerun the same command to go "
                                "on from there", counts.prompts, name, directory)
                    raise
                samples += made
                done.add(batch_counts)
                bar.set_postfix(kept=counts.kept + done.kept, dropped=counts.prompts + done.prompts - counts.kept
                                - done.kept, anchors=counts.anchors + done.anchors, refresh=False)
                bar.update(len(batch))  # draws the bar with the counts above
            done.critic_failed = make.critic.failed - failed_before
            write_atomic_shard(path, samples, done, index * config.prompts_per_shard)
            counts.add(done)
            log.info("%s: shard %d written (%d pairs and %d anchors from %d prompts)", name, index, done.kept,
                     done.anchors, done.prompts)
    if resumed:
        log.info("%s: %d prompts were already done by an earlier run and skipped", name, resumed)
    if counts.prompts == 0:
        raise ConfigError(f"data.{name}={pattern!r} gave no prompt: no conversation sample with a user turn")
    return shard_pattern(directory, shards), counts


SETTINGS_FILE = "settings.json"  # what the shards in an output folder were made with


def pair_settings(config: ConstitutionConfig, checkpoint: Path, train: str | None, val: str | None,
                  constitution: Constitution) -> dict[str, Any]:
    """The settings that decide what each shard holds: a rerun that resumes a folder must use the same ones."""
    c = config
    url = c.critic.url and c.critic.url.rstrip("/")  # http://host:8000/ and http://host:8000 are one endpoint
    train, val = (pattern and absolute_pattern(pattern) for pattern in (train, val))  # the same shards from any folder
    return {"checkpoint": str(checkpoint.resolve()), "data.train": train, "data.val": val, "critic.kind": c.critic.kind,
            "critic.url": url, "critic.api": c.critic.api, "critic.model": c.critic.model,
            "critic.max_new_tokens": c.critic.max_new_tokens, "constitution": constitution.source,
            "constitution_digest": constitution.digest,
            "mode": c.mode, "num_samples": c.num_samples, "temperature": c.temperature, "top_p": c.top_p,
            "max_new_tokens": c.max_new_tokens, "anchors": c.anchors, "batch_size": c.batch_size,
            "prompts_per_shard": c.prompts_per_shard, "seed": c.seed, "sampling_seeds": SAMPLING_SEEDS,
            # the prompt shards as they are now: one rewritten in place under the same name would keep the old pairs
            "data_files": {split: [file_version(shard) for shard in list_shards(pattern, f"data.{split}")]
                           for split, pattern in (("train", train), ("val", val)) if pattern}}


SAMPLING_SEEDS = "per split"  # how `sampling_seed` draws; folders that record none drew the splits' seeds alike
OLDER_FOLDERS = {"sampling_seeds": "shared by train and val"}  # what a folder recording no such key was made with


def changed_files(recorded: dict[str, list], now: dict[str, list]) -> str:
    """The first prompt shard that differs from the one its pairs were made from, for the refusal."""
    for split in sorted(set(recorded) | set(now)):
        before, after = recorded.get(split, []), now.get(split, [])
        for old, new in zip(before, after, strict=False):
            if old != new:
                shard = (new or old or "?").split("|")[0]
                return f"data.{split}'s shard {shard!r} as it was before (it has changed since)"
        if len(before) != len(after):
            return f"data.{split} as {len(before)} shards (now {len(after)})"
    return "other prompt shards"


def check_resumable(out: Path, settings: dict[str, Any]) -> None:
    """Record `settings` in the output folder; where it already has shards, refuse settings that differ from theirs,
    since those shards would be skipped and kept as they are."""
    recorded_file = out / SETTINGS_FILE
    if shards := list(out.glob("*/shard-*.tar")):
        if not recorded_file.is_file():
            if not any(shard.with_suffix(".json").is_file() for shard in shards):  # a converter's, the prompts...
                raise ConfigError(f"out={str(out)!r} holds shards that vlm.constitution did not write (no pair "
                                  f"counts beside them), and a run there would overwrite them; pass out= for a new "
                                  f"folder")
            # pairs written before settings were recorded: nothing to compare with
            log.warning("%s has pairs but no %s: resuming them without checking their settings", out, SETTINGS_FILE)
            return
        recorded = json.loads(recorded_file.read_text())
        same_text = recorded.get("constitution_digest") == settings["constitution_digest"]
        recorded = {**OLDER_FOLDERS, **recorded}
        for key in ("data.train", "data.val"):  # older folders record the patterns as typed, from this folder
            if recorded.get(key):
                recorded[key] = absolute_pattern(recorded[key])
        changed = [k for k in settings if k in recorded and recorded[k] != settings[k]  # older folders record fewer
                   and not (k == "constitution" and same_text)]  # the same file by another path
        if changed:
            listed = ", ".join(changed_files(recorded[k], settings[k]) if k == "data_files" else
                               f"{k}={recorded.get(k)!r} (now {settings[k]!r})" for k in changed)
            raise ConfigError(f"{out} holds pairs made with {listed}; a rerun there resumes them as they are. Pass "
                              f"out= for a new folder, or delete {out} to start over")
        return
    out.mkdir(parents=True, exist_ok=True)
    recorded_file.write_text(json.dumps(settings, indent=2) + "\n")
