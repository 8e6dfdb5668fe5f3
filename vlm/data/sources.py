"""Where a stage's data comes from: the user's shards, or the synthetic dataset generated into the cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vlm.config import DataConfig
from vlm.data import synthetic
from vlm.data.shards import list_shards

log = logging.getLogger(__name__)


@dataclass
class DataSources:
    train: str
    val: str | None
    classnames: list[str] | None  # label order for zero-shot classification; None: retrieval metrics only


def read_classnames(path: str | Path) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.classnames={str(path)!r} does not exist")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"data.classnames={str(path)!r} is empty; write one class name per line, in label order")
    return names


def resolve(config: DataConfig, kind: str) -> DataSources:
    """Shard patterns for a stage reading `kind` ("captions" or "conversations")."""
    if config.train is None:
        s = config.synthetic
        splits = {split: synthetic.ensure_split(kind, split, num, s.seed, s.image_size, s.samples_per_shard,
                                                s.cache_dir)
                  for split, num in (("train", s.num_train), ("val", s.num_val))}
        log.info("no data.train given: using the synthetic shapes dataset (%d train / %d held-out) from %s",
                 s.num_train, s.num_val, Path(s.cache_dir).expanduser())
        return DataSources(splits["train"], splits["val"], list(synthetic.CLASSNAMES))
    classnames = None
    if config.classnames:
        classnames = read_classnames(config.classnames)
    elif config.val:
        beside = Path(list_shards(config.val, "data.val")[0]).parent / "classnames.txt"
        if beside.is_file():
            classnames = read_classnames(beside)
    return DataSources(config.train, config.val, classnames)
