"""The stage table: each stage's task, what it trains (every other part is frozen), which data it reads, and which
stage's newest export it starts from. Stage names are defined here and nowhere else.

Adding a stage is one row here, one task class (a `StageTask`) and one YAML file in configs/stage/.
"""

from __future__ import annotations

from vlm.config import ConfigError, closest
from vlm.training.contrastive import ContrastiveTask
from vlm.training.preference_task import PreferenceTask
from vlm.training.task import Stage
from vlm.training.vlm_task import VLMTask

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("contrastive", ContrastiveTask, frozenset({"vision", "text", "clip_head"}), "captions", None),
    Stage("align", VLMTask, frozenset({"projector"}), "captions", "contrastive"),
    Stage("sft", VLMTask, frozenset({"projector", "llm"}), "conversations", "align"),
    Stage("dpo", PreferenceTask, frozenset({"projector", "llm"}), "preferences", "sft"),
)}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        match = closest(name, STAGES)
        hint = f" Did you mean {match!r}?" if match else ""
        raise ConfigError(f"stage.name={name!r} is not a stage; choose one of {list(STAGES)}.{hint}")
    return STAGES[name]
