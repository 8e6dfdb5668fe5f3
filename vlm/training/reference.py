"""The half of DPO that never trains: the reference policy, and the answer log-probs both policies are compared by.

`Reference` is either a frozen copy of the starting model (the default) or, with `stage.precompute_reference=true`,
the answer log-probs that model gave every pair, computed in one pass before the first step, so that no second model
sits in memory while training.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlm.config import ConfigError
from vlm.data.shards import build_pipeline, make_loader
from vlm.exports.format import read_meta
from vlm.models.losses import answer_logprobs
from vlm.models.vlm import VisionLanguageModel
from vlm.training.strategy import every_rank

if TYPE_CHECKING:
    from vlm.training.preference_task import PreferenceTask

log = logging.getLogger(__name__)
FSDP_WRAPPER = "_fsdp_wrapped_module."  # in the state-dict keys of modules FSDP wraps, until its hooks remove it


def pair_logps(model: VisionLanguageModel, pairs: dict[str, Any],
               patches: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`model`'s summed answer log-probs (2B,) (chosen rows, then rejected) and answer token counts (2B,), from the
    vision tower's patch features (N_tiles, P, Dv) of the B prompts' tiles; None: `model`'s tower computes them (on
    no tiles too: under FSDP every rank must run the tower's blocks)."""
    if patches is None:
        patches = model.vision.patch_features(pairs["pixel_values"])
    patches = torch.cat([patches, patches])  # (2 N_tiles, P, Dv): the rejected rows show the chosen rows' images
    logits = model(pairs["input_ids"], pairs["attention_mask"], image_slots=pairs["image_slots"],
                   patches=patches).logits  # (2B, L, V)
    return answer_logprobs(logits, pairs["labels"])


def recorded_reference(given: str | None, directory: Path) -> str:
    """The export a dpo export's rewards are measured against (for vlm.eval): `given` (stage.reference), else the one
    its run started from, as recorded in the export."""
    if given:
        if not Path(given).expanduser().is_dir():
            raise ConfigError(f"stage.reference={given!r} is not a folder; give the export its dpo run started from")
        log.info("stage.reference=%s: the rewards are measured against it", given)
        return given
    source = (read_meta(directory).train_config or {}).get("reference")
    if not source or not Path(source).expanduser().is_dir():
        raise ConfigError(f"the rewards of {str(directory)!r} need its reference model: pass stage.reference="
                          f"EXPORT (the export its dpo run started from; recorded: {source!r})")
    log.info("stage.reference=%s: the export its run started from (recorded in the export), which the rewards are "
             "measured against", source)
    return source


class Reference(torch.nn.Module):
    """The frozen reference of `stage=dpo`: `model` (eval mode whatever the task's mode, no gradients, never in the
    optimizer), or with `model=None` a table of precomputed log-probs, filled by `precompute`, kept in checkpoints.

    Checkpoints leave the model's weights out: they are the export's the run started from, which a resumed run is
    built from again (vlm/training/resume.py), so a second copy of the LLM in every checkpoint would buy nothing."""

    def __init__(self, model: VisionLanguageModel | None, source: str | None):
        super().__init__()
        self.model = model
        if model is not None:
            model.requires_grad_(False).eval()
        self.source = source  # the export it came from, recorded in the dpo export
        self.table: dict[str, tuple[float, float]] = {}  # precomputed: pair key -> (chosen, rejected)
        self._prefix = ""  # this module's key prefix in the state dict being loaded
        self.register_load_state_dict_pre_hook(self._note_prefix)
        self.register_load_state_dict_post_hook(self._allow_missing_model)

    def leave_out_model(self, checkpoint: dict[str, Any], prefix: str) -> None:
        """Drop the model's weights from a checkpoint whose state dict holds this module's under `prefix`. (Done on
        the finished checkpoint, not by a state-dict hook: FSDP's own hooks expect every weight of their units.)"""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(f"{prefix}model.")]:
            del state[key]

    def _note_prefix(self, module: Reference, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        self._prefix = prefix

    def _allow_missing_model(self, module: Reference, incompatible: Any) -> None:
        # the model keeps the weights it was built with (a checkpoint written before they were left out loads them).
        # Under FSDP the keys still name its wrappers here; its own hooks drop those names later
        ours = f"{self._prefix}model.".replace(FSDP_WRAPPER, "")
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                        if not k.replace(FSDP_WRAPPER, "").startswith(ours)]

    def train(self, mode: bool = True) -> Reference:
        return super().train(False)  # no dropout: the reference's log-probs must not change between calls

    @torch.no_grad()
    def pair_logps(self, pairs: dict[str, Any], patches: torch.Tensor | None) -> torch.Tensor:
        """The reference's answer log-probs (2B,): from the model (sharing the policy's patch features while the
        vision tower is frozen; a trained tower passes None and the reference computes its own), or from the table."""
        if self.model is None:
            try:
                rows = [self.table[key] for key in pairs["keys"]]
            except KeyError as err:
                raise ConfigError(f"no precomputed reference log-probs for pair {err}: data.train or data.val changed "
                                  f"after this run's precomputing pass (stage.precompute_reference=true); resume it "
                                  f"with its own data, or start a new run without resume") from None
            chosen, rejected = zip(*rows, strict=True)
            return torch.tensor(chosen + rejected, device=pairs["input_ids"].device)
        return pair_logps(self.model, pairs, patches)[0]

    @torch.no_grad()
    def precompute(self, task: PreferenceTask, urls: list[str], rank: int = 0, world_size: int = 1) -> None:
        """Fill the table: every pair's (chosen, rejected) summed answer log-probs under the task's model as it is now
        (before training), over every pair in `urls` (train and held-out: validation's rewards need them too).
        Memory: two floats a pair. With several ranks each computes every `world_size`-th batch, making as many
        forward calls as the busiest rank (FSDP's ranks gather weights together), and the ranks then share their
        tables, so each holds the whole one."""
        started, batching = time.time(), task.batching()
        was_training = task.model.training
        task.model.eval()
        loader = make_loader(build_pipeline(urls, batching.val_decode, train=False, split_by_node=False),
                             batching.eval_batch_size, 0, batching.collate, drop_last=False)
        batches = computed = 0
        last = None
        for batch in loader:
            if batch["pairs"] is None:
                continue
            last, batches = batch["pairs"], batches + 1
            if (batches - 1) % world_size == rank:
                self.table.update(self._logps(task, last))
                computed += 1
        for _ in range(math.ceil(batches / world_size) - computed):  # a forward call to keep pace, result unused
            self._logps(task, last)
        mine = len(self.table)
        if world_size > 1:
            self.table = {key: logps for table in every_rank(self.table) for key, logps in table.items()}
        task.model.train(was_training)
        log.info("reference log-probs of %d pairs precomputed in %.1f s (%d of them on rank %d of %d)",
                 len(self.table), time.time() - started, mine, rank, world_size)

    @staticmethod
    def _logps(task: PreferenceTask, pairs: dict[str, Any]) -> dict[str, tuple[float, float]]:
        """{pair key: (chosen, rejected) summed answer log-probs} of one batch of pairs under the task's model."""
        pairs = {k: v.to(task.device) if isinstance(v, torch.Tensor) else v for k, v in pairs.items()}
        logps = pair_logps(task.model, pairs)[0].tolist()
        half = len(logps) // 2
        return {key: (logps[i], logps[half + i]) for i, key in enumerate(pairs["keys"])}
