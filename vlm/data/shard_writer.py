"""Writing shards: one split's samples as shard-000000.tar, shard-000001.tar, ..., each whole or absent.

Used by the synthetic dataset, the converters in data_scripts/ and the constitution pipeline's pattern. Light to
import: webdataset (and with it torch) is loaded when the first sample is written, so a converter's `--help` answers
at once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def shard_pattern(directory: Path, shards: int) -> str:
    """The brace pattern naming `shards` shards written by ShardSplitWriter in `directory`."""
    return str(directory / f"shard-{{000000..{shards - 1:06d}}}.tar")


class ShardSplitWriter:
    """Writes one split's samples as DIRECTORY/shard-000000.tar, shard-000001.tar, ... of `samples_per_shard` each.

    Each shard is written as NAME.partial and renamed once whole, so an interrupted run leaves no cut-off shard that a
    shard pattern would read; the first is opened only when a sample arrives, so no empty tar is left behind. As a
    context manager, an exception (Ctrl-C too) leaves the shard in progress under its .partial name."""

    NAME = "shard-%06d.tar"

    def __init__(self, directory: Path, samples_per_shard: int) -> None:
        self.directory, self.samples_per_shard = directory, samples_per_shard
        self.sink: Any = None  # a webdataset ShardWriter once the first sample arrives
        self.samples = 0

    def write(self, sample: dict[str, Any]) -> None:
        if self.sink is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            import webdataset as wds  # with the first sample: it loads torch, which a converter's --help need not

            self.sink = wds.ShardWriter(str(self.directory / f"{self.NAME}.partial"), maxcount=self.samples_per_shard,
                                        verbose=0, post=lambda name: os.replace(name, name.removesuffix(".partial")))
        self.sink.write(sample)
        self.samples += 1

    def close(self, whole: bool = True) -> None:
        """`whole=False` (the run was interrupted): the shard in progress keeps its .partial name."""
        if self.sink is not None:
            if not whole:
                self.sink.post = None
            self.sink.close()

    def shards(self) -> int:
        """Whole shards in the directory."""
        return len(list(self.directory.glob("shard-*.tar")))

    def pattern(self) -> str:
        """The brace pattern that reads the split back (`data.train=` / `data.val=`)."""
        return shard_pattern(self.directory, self.shards())

    def __enter__(self) -> ShardSplitWriter:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *_: Any) -> None:
        self.close(whole=error_type is None)
