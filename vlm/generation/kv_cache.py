"""KV caches for `generate` that keep less than every past key.

`LocalGlobalCache`: for models with local + global attention (vlm.models.attention). Once a key has left the local
window and is neither global nor a sink, no later token can read it, so the cache drops it: after N tokens it holds
at most window + N / stride + sinks + 1 keys instead of N. Each layer still reports the cumulative length, so RoPE
positions and masks count every token seen.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from vlm.models.attention import KEY_INDICES, SparsePattern, uses_pattern


class KeepPlan:
    """Which cached keys survive a step. Every layer caches the same positions, so the first layer to reach a step
    works its keep set out (one device-to-host sync) and the others reuse it."""

    def __init__(self):
        self.step: tuple[int, int] | None = None  # (tokens seen, keys held before dropping) it was made for
        self.keep = torch.zeros(0, dtype=torch.long)  # (K',) indices into those keys

    def keep_for(self, pattern: SparsePattern, indices: torch.Tensor, positions: torch.Tensor,
                 seen: int) -> torch.Tensor:
        step = (seen, indices.numel())
        if self.step != step:
            self.keep = pattern.needed_later(indices, positions, seen).nonzero().squeeze(-1)
            self.step = step
        return self.keep


class LocalGlobalLayer(DynamicLayer):
    """One layer's keys and values (B, H_kv, K, D), holding only the keys a later query can read.

    `update` returns the kept keys plus the new ones and tells the attention function their absolute positions
    through the attention kwargs (`KEY_INDICES`), so it reads the right columns of a mask built over all positions.
    Layers of one cache share a `KeepPlan`.
    """

    is_croppable = False

    def __init__(self, pattern: SparsePattern, plan: KeepPlan | None = None):
        super().__init__()
        self.pattern = pattern
        self.plan = plan or KeepPlan()
        self.cumulative_length = 0  # tokens seen, dropped ones included
        self.key_indices = torch.zeros(0, dtype=torch.long)  # (K,) absolute position of each cached key
        self.key_positions = torch.zeros(0, 0, dtype=torch.long)  # (B, K) its position within each row's sample

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               kwargs: dict[str, Any] | None = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.key_indices = torch.zeros(0, dtype=torch.long, device=self.device)
            self.key_positions = torch.zeros(key_states.shape[0], 0, dtype=torch.long, device=self.device)
        new = key_states.shape[-2]
        new_indices = torch.arange(self.cumulative_length, self.cumulative_length + new, device=self.device)  # (Q,)
        position_ids = (kwargs or {}).get("position_ids")  # (B or 1, Q): positions within each sample
        new_positions = new_indices if position_ids is None else position_ids.to(self.device)
        keys = torch.cat([self.keys, key_states], dim=-2)  # (B, H_kv, K + Q, D)
        values = torch.cat([self.values, value_states], dim=-2)
        indices = torch.cat([self.key_indices, new_indices])  # (K + Q,)
        positions = torch.cat([self.key_positions, new_positions.expand(key_states.shape[0], new)], dim=-1)
        self.cumulative_length += new
        if kwargs is None:  # an attention that calls update without its kwargs (GPT-NeoX) cannot be told which keys
            # these are, so every key is kept: the mask then covers them all, and only the memory saving is lost
            self.keys, self.values, self.key_indices, self.key_positions = keys, values, indices, positions
            return keys, values
        kwargs[KEY_INDICES] = indices
        keep = self.plan.keep_for(self.pattern, indices, positions, self.cumulative_length)  # (K',)
        self.keys, self.values = keys.index_select(-2, keep), values.index_select(-2, keep)
        self.key_indices, self.key_positions = indices[keep], positions.index_select(-1, keep)
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Masks cover every position seen; the attention function narrows them to the cached keys."""
        return self.cumulative_length + query_length, 0

    def cached_length(self) -> int:
        """Keys held now."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def reset(self) -> None:
        super().reset()
        self.plan.step = None
        self.key_indices = torch.zeros(0, dtype=torch.long)
        self.key_positions = torch.zeros(0, 0, dtype=torch.long)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a local_global cache has dropped keys and cannot be cropped")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.cached_length():
            self.key_positions = self.key_positions.index_select(0, beam_idx.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.key_positions = self.key_positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.key_positions = self.key_positions[indices]


class LocalGlobalCache(Cache):
    """A cache of `LocalGlobalLayer`s, one per decoder layer."""

    def __init__(self, pattern: SparsePattern, num_layers: int):
        plan = KeepPlan()
        super().__init__(layers=[LocalGlobalLayer(pattern, plan) for _ in range(num_layers)])


def cached_bytes(cache: Cache) -> int:
    """Bytes of keys and values any cache (dynamic, pattern, H2O) holds now, all layers."""
    return sum(t.numel() * t.element_size() for layer in cache.layers if layer.keys is not None
               for t in (layer.keys, layer.values))


def cache_for(lm: PreTrainedModel) -> Cache | None:
    """The cache `generate` should use for `lm`: a LocalGlobalCache for local + global attention, else None (the
    default dynamic cache)."""
    pattern = uses_pattern(lm)
    if pattern is None:
        return None
    return LocalGlobalCache(pattern, lm.config.get_text_config().num_hidden_layers)


def cache_kwargs(lm: PreTrainedModel) -> dict[str, Cache]:
    """`generate` kwargs giving `lm` a fresh cache of the right kind: {} keeps transformers' default."""
    cache = cache_for(lm)
    return {} if cache is None else {"cache": cache}
