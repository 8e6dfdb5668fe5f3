"""The stage table: what each stage trains, what it freezes, which data it reads and which stage it builds on."""

from __future__ import annotations

from dataclasses import dataclass

from vlm.config import STAGE_NAMES, StageConfig


@dataclass(frozen=True)
class Stage:
    name: str
    trains: frozenset[str]  # model parts with requires_grad=True; every other part is frozen
    data: str  # "captions" (image + txt) or "conversations" (images + LLaVA-style json)
    previous: str | None  # the stage whose latest export this one starts from by default


STAGES: dict[str, Stage] = {
    "contrastive": Stage("contrastive", frozenset({"vision", "text", "clip_head"}), "captions", None),
    "align": Stage("align", frozenset({"projector"}), "captions", "contrastive"),
    "sft": Stage("sft", frozenset({"projector", "llm"}), "conversations", "align"),
}
assert tuple(STAGES) == STAGE_NAMES


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {sorted(STAGES)}")
    return STAGES[name]


def trainable_parts(config: StageConfig) -> frozenset[str]:
    """The stage's table entry with the `stage.train_*` overrides applied."""
    parts = set(get_stage(config.name).trains)
    overrides = {"vision": config.train_vision, "llm": config.train_llm, "projector": config.train_projector}
    for part, flag in overrides.items():
        if flag is True:
            parts.add(part)
        elif flag is False:
            parts.discard(part)
    return frozenset(parts)
