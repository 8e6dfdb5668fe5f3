"""`stage.precompute_reference=true`: the reference model's answer log-probs for every pair, computed once before
the first step with the starting weights, so that no second model sits in memory while training."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from vlm.data.shards import build_pipeline, make_loader

if TYPE_CHECKING:
    from vlm.training.preference_task import PreferenceTask

log = logging.getLogger(__name__)


@torch.no_grad()
def precompute_reference(task: PreferenceTask, urls: list[str]) -> dict[str, tuple[float, float]]:
    """{pair key: (chosen, rejected) summed answer log-probs} under the task's model as it is now (before training),
    over every pair in `urls` (train and held-out: validation's rewards need them too). Memory: two floats a pair."""
    started, batching = time.time(), task.batching()
    table: dict[str, tuple[float, float]] = {}
    was_training = task.model.training
    task.model.eval()
    loader = make_loader(build_pipeline(urls, batching.val_decode, train=False, split_by_node=False),
                         batching.eval_batch_size, 0, batching.collate, drop_last=False)
    for batch in loader:
        pairs = batch["pairs"]
        if pairs is None:
            continue
        pairs = {k: v.to(task.device) if isinstance(v, torch.Tensor) else v for k, v in pairs.items()}
        patches = task.model.vision.patch_features(pairs["pixel_values"]) if pairs["pixel_values"].numel() else None
        logps = task.pair_logps(task.model, pairs, patches)[0].tolist()
        half = len(logps) // 2
        table.update({key: (logps[i], logps[half + i]) for i, key in enumerate(pairs["keys"])})
    task.model.train(was_training)
    log.info("reference log-probs of %d pairs precomputed in %.1f s", len(table), time.time() - started)
    return table
