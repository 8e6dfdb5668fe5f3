"""Local + global sparse attention for any Hugging Face causal LM that uses transformers' attention interface.

A query at position q (counted from its sample's first token) reads a key at position k <= q when
    q - k < window   (the local window)   or   k % stride == 0   (global tokens)   or   k < sinks   (attention sinks).
Cost grows as N * (window + N / stride) instead of N^2.

The pattern is one `mask_mod(batch, head, q_idx, kv_idx)` and reaches the model through two registrations under the
name `local_global`, both needed:
- a mask function (`AttentionMaskInterface`): the causal mask transformers would build, AND the pattern. It gives a
  boolean SDPA mask (never skipped for `is_causal`, which would drop the pattern) or, with `kernel=flex` over a whole
  sequence on a GPU, a flex_attention `BlockMask`. Without padding the BlockMask is cached by length and reads keys
  with the global ones gathered in front (see `gathered_mask_mod`), so whole blocks are skipped; with padding or
  packing it is built per batch over the plain layout. CPUs always get the boolean mask (see `flex_runs_on`);
- an attention function (`AttentionInterface`): SDPA with that mask, or flex_attention with the BlockMask. It refuses
  to run without a mask: a name registered without a mask function makes transformers drop the mask silently.

Masks are built over absolute key positions. A pattern-aware KV cache (vlm.generation.kv_cache) keeps only the keys
a later query can read; it reports which positions its keys hold (`KEY_INDICES`), and the attention function picks
those columns of the mask.

`pattern_mask_mod` and `local_global_mask` take per-token positions within each sample (and sample ids), so a packed
row (several samples in one row) masks each sample on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    and_masks,
    causal_mask_function,
    flex_attention_mask,
    prepare_padding_mask,
    sdpa_mask,
)

from vlm.config import ConfigError, LLMConfig, SparseAttentionConfig
from vlm.models.packing import register_packed_mask

log = logging.getLogger(__name__)

ATTENTION_NAME = "local_global"
PATTERN_ATTRIBUTE = "local_global_attention"  # where the pattern lives on the LLM's Hugging Face config
KEY_INDICES = "local_global_key_indices"  # attention kwarg: absolute positions (K,) of the keys a cache returned
DENSE = "sdpa"  # the attention implementation `attention=dense` restores

MaskMod = Callable[[Any, Any, Any, Any], Any]


class MaskMissingError(RuntimeError):
    """local_global attention was called without its mask: the pattern would silently become full attention."""


@dataclass(frozen=True)
class SparsePattern:
    """The local + global pattern; see the module docstring."""

    window: int
    stride: int
    sinks: int
    kernel: str = "sdpa"

    def readable(self, query_position: Any, key_position: Any) -> Any:
        """Whether a query may read a key, positions within one sample (tensors broadcast); causality is separate."""
        return (query_position - key_position < self.window) | (key_position % self.stride == 0) | (
            key_position < self.sinks)

    def needed_later(self, key_index: torch.Tensor, key_position: torch.Tensor, next_query_index: int) -> torch.Tensor:
        """(K,) keys some later query can still read, given their absolute indices (K,) and their positions within
        each row's sample (B, K). Window distances are the same in every row; global and sink keys may differ by row
        (left padding), so a key any row needs is kept."""
        in_window = next_query_index - key_index < self.window  # (K,)
        fixed = ((key_position % self.stride == 0) | (key_position < self.sinks)).any(dim=0)  # (K,)
        return in_window | fixed

    def uses_flex(self, device: torch.device | str) -> bool:
        """Whether this pattern's attention runs through flex_attention on `device` (`kernel=flex` there)."""
        return self.kernel == "flex" and flex_runs_on(device)

    def as_dict(self) -> dict[str, Any]:
        return {"window": self.window, "stride": self.stride, "sinks": self.sinks, "kernel": self.kernel}


def pattern_mask_mod(pattern: SparsePattern, positions: torch.Tensor | None = None,
                     sample_ids: torch.Tensor | None = None) -> MaskMod:
    """The causal local + global mask_mod over row indices. `positions` (B, L): each token's position within its
    sample (None: the row index itself); `sample_ids` (B, L): tokens of different samples never see each other
    (packed rows). Works on broadcast index tensors (SDPA masks) and under vmap (flex BlockMasks)."""

    def mask_mod(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        if positions is None:
            query_position, key_position = q_idx, kv_idx
        else:
            query_position, key_position = positions[batch_idx, q_idx], positions[batch_idx, kv_idx]
        allowed = (kv_idx <= q_idx) & pattern.readable(query_position, key_position)
        if sample_ids is not None:
            allowed = allowed & (sample_ids[batch_idx, q_idx] == sample_ids[batch_idx, kv_idx])
        return allowed

    return mask_mod


def sample_positions(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 1/True on real tokens -> (B, L) each token's position from its sample's first real token (what
    transformers' generate gives as position ids); padding gets 0 and is masked anyway."""
    return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)


def segment_positions(mask_function: MaskMod, batch_size: int, length: int,
                      device: torch.device | str) -> torch.Tensor | None:
    """(B, L) each token's position from its segment's first token, where `mask_function` keeps a token from reading
    the one just before it: transformers' own packed rows (position ids restarting at 0 and no attention mask, as
    `DataCollatorWithFlattening` writes them), whose mask remaps only the causal part to each sample's positions.
    None when every token reads the one before it (one segment per row)."""
    index = torch.arange(length, device=device)
    rows = torch.arange(batch_size, device=device)[:, None]
    reads_previous = torch.broadcast_to(mask_function(rows, 0, index[None, 1:], index[None, 1:] - 1),
                                        (batch_size, length - 1))
    if bool(reads_previous.all()):
        return None
    starts = torch.cat([torch.ones(batch_size, 1, dtype=torch.bool, device=device), ~reads_previous], dim=1)
    segment_start = torch.where(starts, index, 0).cummax(dim=1).values  # (B, L) index of each token's first token
    return index - segment_start


def local_global_mask(pattern: SparsePattern, positions: torch.Tensor, sample_ids: torch.Tensor | None = None,
                      padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A 4D boolean mask (B, 1, L, L) for rows of `positions` (B, L), e.g. packed rows with their position ids and
    sample ids. Passed to the model as `attention_mask`, transformers uses it as-is."""
    batch, length = positions.shape
    return sdpa_mask(batch, length, length, mask_function=pattern_mask_mod(pattern, positions, sample_ids),
                     attention_mask=padding_mask, allow_is_causal_skip=False, device=positions.device)


def packed_block_mask(pattern: SparsePattern, positions: torch.Tensor, sample_ids: torch.Tensor) -> BlockMask:
    """A flex_attention BlockMask for packed rows: positions and sample ids (B, L) as for `local_global_mask`. Built
    per batch over the plain layout: blocks across samples are skipped and no (L, L) mask is materialised."""
    batch, length = positions.shape
    return create_block_mask(pattern_mask_mod(pattern, positions, sample_ids), B=batch, H=None, Q_LEN=length,
                             KV_LEN=length, device=positions.device, _compile=True)


def flex_runs_on(device: torch.device | str) -> bool:
    """Whether `kernel=flex` runs flex_attention on `device`. CPUs run the same pattern through SDPA's boolean mask:
    torch has no flex_attention backward there, and its CPU compiler fails once the kernel turns dynamic (the second
    prompt length or packed layout it meets, torch 2.14)."""
    return torch.device(device).type != "cpu"


def packed_mask(config: PretrainedConfig, sample_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor | BlockMask:
    """The mask for packed rows (data.packing): the pattern counted from each sample's first token, samples kept
    apart; a BlockMask where flex_attention runs, else the 4D boolean mask."""
    pattern = pattern_of(config)
    if pattern.uses_flex(positions.device):
        return packed_block_mask(pattern, positions, sample_ids)
    return local_global_mask(pattern, positions, sample_ids)


def pattern_of(config: PretrainedConfig) -> SparsePattern:
    settings = getattr(config, PATTERN_ATTRIBUTE, None)
    if not settings:
        raise MaskMissingError(f"the LLM's config uses {ATTENTION_NAME!r} attention but has no "
                               f"{PATTERN_ATTRIBUTE!r} settings; configure it with vlm.models.attention.use_attention")
    return SparsePattern(**settings)


_block_masks: dict[tuple, BlockMask] = {}  # building a BlockMask costs a compile and a pass over all blocks
MAX_BLOCK_MASKS = 16  # lengths kept; the oldest goes first


def global_slots(length: int, stride: int) -> int:
    """Global tokens among `length` positions: 0, stride, 2*stride, ..."""
    return -(-length // stride)


def gathered_mask_mod(pattern: SparsePattern, length: int) -> MaskMod:
    """The pattern over keys laid out as [the G global keys, gathered (G = global_slots)] + [all L keys].

    With stride smaller than flex_attention's 128-wide blocks, every block of keys holds a global token, so a
    BlockMask over the plain layout skips nothing. Gathered, the globals fill G / 128 dense blocks and the rest is a
    band of width `window` (plus the sinks' first block). Each readable key is allowed exactly once: from the global
    segment when it is global, outside the window and not a sink; from the plain segment otherwise."""
    slots = global_slots(length, pattern.stride)

    def mask_mod(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        global_position = kv_idx * pattern.stride
        from_globals = (global_position <= q_idx) & (q_idx - global_position >= pattern.window) & (
            global_position >= pattern.sinks)
        position = kv_idx - slots
        from_plain = (position <= q_idx) & ((q_idx - position < pattern.window) | (position < pattern.sinks))
        return torch.where(kv_idx < slots, from_globals, from_plain)

    return mask_mod


def gather_globals(states: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, H, L, D) keys or values -> (B, H, G + L, D): the global ones first, for `gathered_mask_mod`."""
    return torch.cat([states[:, :, ::stride], states], dim=-2)


def gathered_block_mask(pattern: SparsePattern, length: int, device: torch.device | str) -> BlockMask:
    """The BlockMask for a whole unpadded sequence of `length` queries over keys laid out by `gather_globals`; cached
    by pattern, length and device."""
    key = (pattern, length, str(device))
    if key not in _block_masks:
        if len(_block_masks) >= MAX_BLOCK_MASKS:
            del _block_masks[next(iter(_block_masks))]
        gathered = length + global_slots(length, pattern.stride)
        _block_masks[key] = create_block_mask(gathered_mask_mod(pattern, length), B=None, H=None, Q_LEN=length,
                                              KV_LEN=gathered, device=device, _compile=True)
    return _block_masks[key]


def _mask_for_attention(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: int = 0,
                        mask_function: MaskMod = causal_mask_function, attention_mask: torch.Tensor | None = None,
                        config: PretrainedConfig | None = None, device: torch.device | str = "cpu",
                        **kwargs: Any) -> torch.Tensor | BlockMask:
    """The AttentionMaskInterface function: transformers' mask (causal, padding, packing) AND the pattern, over
    absolute positions; with padding, positions count from each row's first real token, and in transformers' packed
    rows from each sample's."""
    pattern = pattern_of(config)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (B, kv_offset + kv_length) or None
    padded = padding is not None and not bool(padding.all())
    whole_sequence = isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0 and q_length == kv_length
    if padded:
        positions = sample_positions(padding)
    elif whole_sequence and mask_function is not causal_mask_function and q_length > 1:
        positions = segment_positions(mask_function, batch_size, q_length, device)
    else:
        positions = None
    mask_mod = and_masks(mask_function, pattern_mask_mod(pattern, positions))
    if whole_sequence and pattern.uses_flex(device):
        if padded or mask_function is not causal_mask_function:  # depends on the data: built per batch
            return flex_attention_mask(batch_size, q_length, kv_length, mask_function=mask_mod,
                                       attention_mask=attention_mask, device=device)
        return gathered_block_mask(pattern, q_length, device)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function=mask_mod,
                     attention_mask=attention_mask, allow_is_causal_skip=False, use_vmap=kwargs.get("use_vmap", False),
                     device=device)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | BlockMask | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The AttentionInterface function. query (B, H, Q, D), key/value (B, H_kv, K, D); the mask covers absolute key
    positions (B, 1, Q, N >= K), narrowed to the K keys a pattern cache returned."""
    key_indices = kwargs.pop(KEY_INDICES, None)
    if attention_mask is None:
        raise MaskMissingError(f"{ATTENTION_NAME!r} attention got no mask: its mask function is not registered with "
                               f"transformers' AttentionMaskInterface, or the model builds its mask another way")
    if isinstance(attention_mask, BlockMask):
        if attention_mask.seq_lengths[1] != key.shape[-2]:  # the gathered layout: global keys first
            stride = pattern_of(module.config).stride
            key, value = gather_globals(key, stride), gather_globals(value, stride)  # (B, H_kv, G + L, D)
        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask.shape[-1] != key.shape[-2]:
        if key_indices is None or len(key_indices) != key.shape[-2]:
            raise MaskMissingError(f"the mask covers {attention_mask.shape[-1]} key positions but attention got "
                                   f"{key.shape[-2]} keys and no {KEY_INDICES!r} saying which")
        attention_mask = attention_mask.index_select(-1, key_indices.to(attention_mask.device))  # (B, 1, Q, K)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Register the attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _mask_for_attention)
    register_packed_mask(ATTENTION_NAME, packed_mask)  # packed rows (data.packing=true)


def use_attention(lm: PreTrainedModel, settings: LLMConfig) -> None:
    """Switch `lm` to `settings.attention` (model.llm.attention) in place; the pattern goes on its config, so exports
    of its config carry it."""
    if settings.attention == "dense":
        if vars(settings.sparse) != vars(SparseAttentionConfig()):
            log.warning("model.llm.sparse.* is set (%s) and has no effect: the pattern applies with "
                        "model.llm.attention=local_global, and this model attends densely",
                        ", ".join(f"{k}={v}" for k, v in vars(settings.sparse).items()))
        if lm.config._attn_implementation == ATTENTION_NAME:
            lm.set_attn_implementation(DENSE)
        if hasattr(lm.config, PATTERN_ATTRIBUTE):
            delattr(lm.config, PATTERN_ATTRIBUTE)
        return
    if not getattr(type(lm), "_supports_attention_backend", False):
        raise ConfigError(f"model.llm.attention={settings.attention!r} needs an LLM that uses transformers' attention "
                          f"interface; {type(lm).__name__} does not (use model.llm.attention=dense)")
    if problem := unsupported_attention(lm.config):
        raise ConfigError(f"model.llm.attention={settings.attention!r} cannot attend as {type(lm).__name__} does: "
                          f"{problem} (use model.llm.attention=dense)")
    register()
    setattr(lm.config, PATTERN_ATTRIBUTE, SparsePattern(**vars(settings.sparse)).as_dict())
    lm.set_attn_implementation(ATTENTION_NAME)
    if lm.config._attn_implementation != ATTENTION_NAME:
        raise ConfigError(f"model.llm.attention={settings.attention!r}: {type(lm).__name__} did not accept the "
                          f"{ATTENTION_NAME!r} attention implementation")


ATTENTION_LAYER_KINDS = ("full_attention", "attention", "sliding_attention")  # names in configs' `layer_types`


def layers_besides_attention(config: Any) -> list[str]:
    """The kinds of layer a hybrid LLM has besides attention, by its config's `layer_types`: convolutions (LFM2),
    linear attention (Qwen3-Next), Mamba (Granite 4), chunked attention (Llama 4). Their state is no cache of keys
    that the local + global pattern or H2O could choose from."""
    return sorted({kind for kind in getattr(config, "layer_types", None) or () if kind not in ATTENTION_LAYER_KINDS})


def slides_within_own_window(config: Any) -> bool:
    """Whether some of an LLM's layers attend within a sliding window of their own (Mistral v0.1, Gemma 2 and 3),
    by `layer_types` where the config lists them, else by `sliding_window`. A window no shorter than the positions
    the LLM has (Phi-3.5's 262,144 for 131,072) never takes effect."""
    layer_types, window = getattr(config, "layer_types", None), getattr(config, "sliding_window", None)
    if not ("sliding_attention" in layer_types if layer_types else window is not None):
        return False
    positions = getattr(config, "max_position_embeddings", None)
    return window is None or positions is None or window < positions


def unsupported_attention(config: Any) -> str | None:
    """What of an LLM's own attention the local + global pattern would silently drop, or None: layers other than
    attention (hybrid LLMs), a sliding window of its own (on some or all layers) and softcapped scores (Gemma 2) are
    not in the pattern's masks, kernels and cache."""
    if others := layers_besides_attention(config):
        return f"it has {', '.join(others)} layers besides attention (layer_types), whose state the pattern's cache " \
               f"cannot hold"
    if slides_within_own_window(config):
        return f"its layers attend within a sliding window of their own (sliding_window={config.sliding_window})"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return f"it softcaps its attention scores (attn_logit_softcapping={config.attn_logit_softcapping})"
    return None


def uses_pattern(lm: PreTrainedModel) -> SparsePattern | None:
    """The pattern `lm` attends with, or None for dense attention."""
    return pattern_of(lm.config) if lm.config._attn_implementation == ATTENTION_NAME else None


register()
