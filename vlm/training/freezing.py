"""Freezing by table: the stage names the parts that train, every other part is frozen and kept in eval mode."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from vlm.config import PREFERENCE_SETTINGS, StageConfig

log = logging.getLogger(__name__)


TRAIN_FLAGS = {"vision": "train_vision", "llm": "train_llm", "projector": "train_projector"}  # part -> stage key


def trainable_parts(table_entry: frozenset[str], config: StageConfig) -> frozenset[str]:
    """The stage table's parts with the `stage.train_*` overrides applied."""
    return parts_with_overrides(table_entry, {part: getattr(config, key) for part, key in TRAIN_FLAGS.items()})


def parts_with_overrides(table_entry: frozenset[str], overrides: dict[str, bool | None]) -> frozenset[str]:
    """The stage table's parts, with each part whose override is True added and each whose override is False
    removed (None: as the table says)."""
    parts = set(table_entry)
    for part, flag in overrides.items():
        if flag is True:
            parts.add(part)
        elif flag is False:
            parts.discard(part)
    return frozenset(parts)


def warn_unread_stage_settings(stage: StageConfig, parts: set[str], reads_preferences: bool) -> None:
    """Say which stage settings this stage reads nothing of: a learning rate or train flag of a part its model lacks
    (stage.lr_llm in contrastive, stage.lr_text in sft), or a preference setting outside the preference stages."""
    if rank_zero_only.rank != 0:
        return
    learning_rates = [field.name for field in dataclasses.fields(stage) if field.name.startswith("lr_")]
    for key in (*learning_rates, *TRAIN_FLAGS.values()):
        part = key.split("_", 1)[1]
        if getattr(stage, key) is not None and part not in parts:
            log.warning("stage.%s=%r has no effect in stage=%s: its model has no %r part (its parts: %s)", key,
                        getattr(stage, key), stage.name, part, ", ".join(sorted(parts)))
    for key in () if reads_preferences else PREFERENCE_SETTINGS:
        if getattr(stage, key) is not None:
            log.warning("stage.%s=%r has no effect in stage=%s: it is a preference setting, read by stage=dpo", key,
                        getattr(stage, key), stage.name)


def apply_freezing(parts: dict[str, nn.Module], trainable: Iterable[str],
                   idle: Iterable[nn.Parameter] = ()) -> dict[str, tuple[int, int]]:
    """Set requires_grad per part, and off for the `idle` parameters (those no forward reads) whatever their part;
    returns {part: (trainable params, total params)} and logs it as a table."""
    trainable = set(trainable)
    for name, module in parts.items():
        module.requires_grad_(name in trainable)
    for parameter in idle:
        parameter.requires_grad_(False)
    counts = {}
    for name, module in parts.items():
        total = sum(p.numel() for p in module.parameters())
        counts[name] = (sum(p.numel() for p in module.parameters() if p.requires_grad), total)
    rows = "\n".join(f"  {name:<10} {'train ' if trained else 'frozen'} {total:>14,d}"
                     for name, (trained, total) in counts.items())
    trained_sum, total_sum = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    log.info("parameters by part (frozen parts run in eval mode):\n%s\n  trainable: %s of %s", rows,
             f"{trained_sum:,d}", f"{total_sum:,d}")
    return counts


def keep_frozen_parts_in_eval(parts: dict[str, nn.Module], trainable: Iterable[str]) -> None:
    """Frozen parts stay in eval mode while the rest trains: no dropout, and BatchNorm statistics stay put."""
    for name, module in parts.items():
        if name not in trainable:
            module.eval()


def keep_batch_norm_statistics(module: nn.Module) -> None:
    """Put every BatchNorm layer of `module` in eval mode: it normalises by its running statistics and no longer
    updates them, as a frozen copy of it does."""
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            sub.eval()


def disable_dropout(module: nn.Module) -> int:
    """Turn off every dropout in `module`, also in training mode: dropout layers, stochastic depth (timm's DropPath)
    and the `attention_dropout` rate Hugging Face attention reads. Returns how many rates were above zero. The config
    the module was built from keeps its rates, so an export trains with them again in a later stage."""
    zeroed = 0
    for sub in module.modules():
        rates = ["p"] if isinstance(sub, nn.modules.dropout._DropoutNd) else ["drop_prob", "attention_dropout"]
        for rate in rates:
            value = getattr(sub, rate, None)
            if isinstance(value, float):
                zeroed += value > 0
                setattr(sub, rate, 0.0)
    return zeroed
