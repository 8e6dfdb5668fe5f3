"""Where a stage's data comes from: the user's shards, or the synthetic dataset generated into the cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vlm.config import ConfigError, DataConfig
from vlm.data import synthetic
from vlm.data.preferences import latest_pairs
from vlm.data.shards import list_shards

log = logging.getLogger(__name__)


@dataclass
class DataSources:
    train: str | None  # None when only held-out data is needed (vlm.eval)
    val: str | None
    classnames: list[str] | None  # label order for zero-shot classification; None: retrieval metrics only
    made_by: str | None = None  # preference pairs of vlm.constitution: the export whose answers they are


def read_classnames(path: str | Path) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.classnames={str(path)!r} does not exist")
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]  # BOM: Notepad
    if not names:
        raise ValueError(f"data.classnames={str(path)!r} is empty; write one class name per line, in label order")
    return names


def resolve(config: DataConfig, kind: str, output_root: str = "checkpoints") -> DataSources:
    """Shard patterns for a stage reading `kind` ("captions", "conversations" or "preferences")."""
    if config.train is None and config.val is not None:
        raise ConfigError("data.val is set but data.train is not; set both, or neither for the synthetic dataset")
    if config.train is None and kind == "preferences":
        return constitution_pairs(output_root)
    if config.train is None:
        refuse_classnames_without_shards(config, "data.train= and data.val=")
        s = config.synthetic
        splits = {split: synthetic.ensure_split(kind, split, s) for split in ("train", "val")}
        log.info("no data.train given: using the synthetic shapes dataset (%d train / %d held-out) from %s",
                 s.num_train, s.num_val, Path(s.cache_dir).expanduser())
        return DataSources(splits["train"], splits["val"], list(synthetic.CLASSNAMES))
    list_shards(config.train, "data.train")  # a bad pattern fails here, before any model is built
    if config.val:
        list_shards(config.val, "data.val")
    else:
        log.warning("data.train is set and data.val is not: nothing is held out, so this run reports no validation "
                    "metrics (metrics.json holds counts only); pass data.val= held-out shards to measure it")
    return DataSources(config.train, config.val, find_classnames(config))


def refuse_classnames_without_shards(config: DataConfig, shard_keys: str) -> None:
    """data.classnames labels one's own held-out shards; the synthetic dataset has class names of its own."""
    if config.classnames:
        raise ConfigError(f"data.classnames={config.classnames!r} names the classes of your own held-out shards, and "
                          f"none are given: the synthetic dataset has class names of its own. Pass {shard_keys} "
                          f"with it, or leave it out")


def find_classnames(config: DataConfig) -> list[str] | None:
    """data.classnames, else classnames.txt beside the held-out shards, else None."""
    if config.classnames:
        return read_classnames(config.classnames)
    if config.val:
        beside = Path(list_shards(config.val, "data.val")[0]).parent / "classnames.txt"
        if beside.is_file():
            return read_classnames(beside)
    return None


def constitution_pairs(output_root: str, missing: str = "data.train") -> DataSources:
    """The newest finished `vlm.constitution` output under OUTPUT_ROOT/constitution: its train pair shards; held out,
    its pairs and the conversations they came from ("qa_val"), scored for answer accuracy. `missing` is the key the
    user left out (training: data.train; vlm.eval: data.val), for messages."""
    root = Path(output_root).expanduser() / "constitution"
    found = latest_pairs(root)
    keys = "data.train= and data.val=" if missing == "data.train" else "data.val="
    if found is None:
        raise ConfigError(f"no {missing} given and no finished preference pairs under {str(root)!r}: run "
                          f"`python -m vlm.constitution` first (with the same output_root), or pass {keys} "
                          f"preference shards (data_scripts/preferences_to_shards.py writes them)")
    folder, record = found
    if missing == "data.train" and not record.get("train"):  # vlm.eval reads the held-out pairs alone
        raise ConfigError(f"the newest preference pairs, {str(folder)!r}, have no train split (written with "
                          f"max_train_prompts=0): rerun `python -m vlm.constitution` with train prompts, or pass "
                          f"{keys} preference shards")
    if missing == "data.train" and record.get("train_pairs") == 0:
        raise ConfigError(f"the newest preference pairs, {str(folder)!r}, hold no train pair (its summary.json counts "
                          f"the prompts and why each answer was dropped): rerun `python -m vlm.constitution` with more "
                          f"prompts or mode=best_of_n, or pass {keys} preference shards")
    if missing == "data.val" and not (record.get("val") or record.get("qa_val")):
        raise ConfigError(f"the newest preference pairs, {str(folder)!r}, have no held-out split (written with "
                          f"max_val_prompts=0): pass data.val= preference or conversation shards")
    log.info("no %s given: using the preference pairs of %s", missing, folder)
    return pair_sources(record)


def pair_sources(found: dict[str, str]) -> DataSources:
    """What stage=dpo trains on from a finished constitution output's record: its train pairs; held out, its pairs
    and the conversations they came from ("qa_val")."""
    held_out = "::".join(p for p in (found["val"], found.get("qa_val")) if p)
    return DataSources(found["train"], held_out, None, found.get("checkpoint"))


def resolve_eval(config: DataConfig, kind: str, output_root: str = "checkpoints") -> DataSources:
    """Held-out data for vlm.eval: data.val, or the synthetic held-out split (for preferences: the newest
    constitution output's held-out pairs and conversations)."""
    if config.val is None and kind == "preferences":
        return DataSources(None, constitution_pairs(output_root, missing="data.val").val, None)
    if config.val is None:
        refuse_classnames_without_shards(config, "data.val=")
        val = synthetic.ensure_split(kind, "val", config.synthetic)
        log.info("scoring on the built-in synthetic held-out %s; pass data.val=SHARDS to score on yours", kind)
        return DataSources(None, val, list(synthetic.CLASSNAMES))
    return DataSources(None, config.val, find_classnames(config))
