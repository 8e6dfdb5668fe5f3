"""Packed rows: several whole samples back to back in one row, each attending only to itself.

A packed row carries its layout in `position_ids`: they restart at 0 at each sample's first token. That is all the
model needs, on every attention implementation:
- sdpa / eager / flex: with `position_ids` and no 2D `attention_mask`, transformers' `create_causal_mask` reads the
  sample boundaries off the position ids and hands the registered mask builder (`AttentionMaskInterface`: `sdpa_mask`,
  `eager_mask`, `flex_attention_mask`) the causal mask function ANDed with its packed-sequence mask function, so
  attention is block-diagonal and causal, with rotary positions counted per sample;
- flash attention: transformers runs the varlen kernel from `position_ids` (cu_seqlens) when the batch is one row,
  so the rows are laid end to end first.
An attention implementation with its own mask (local + global sparse attention) registers a packed-mask builder here
(`register_packed_mask`): it gets each token's sample id and position within its sample (`sample_layout`) and returns
the 4D mask (boolean, or a flex_attention BlockMask) the model then uses as-is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import PretrainedConfig, PreTrainedModel

from vlm.models.blocks import transformer_block_types

# (LLM config, sample ids (B, L), positions (B, L)) -> a 4D mask (B, 1, L, L), boolean or a flex_attention BlockMask,
# that the model uses as its attention mask
PackedMaskBuilder = Callable[[PretrainedConfig, torch.Tensor, torch.Tensor], torch.Tensor | BlockMask]
PACKED_MASKS: dict[str, PackedMaskBuilder] = {}


def register_packed_mask(attention: str, builder: PackedMaskBuilder) -> None:
    """Packed rows under attention implementation `attention` get their mask from `builder` (idempotent)."""
    PACKED_MASKS[attention] = builder


def attention_break_even(lm: PreTrainedModel) -> float:
    """The packed-row width W at which a dense attention kernel's cost per token (a score and a weighted value per key:
    2 x W x heads x head_dim) equals the linear layers' (a multiply-add per weight of a decoder layer: q, k, v, o and
    the MLP, gated or not; a mixture of experts counts every expert, so its W comes out high); unbounded for varlen
    flash kernels, which never compute across samples."""
    if (lm.config._attn_implementation or "").startswith("flash"):
        return math.inf
    text = lm.config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    layer_types = tuple(transformer_block_types(lm))  # its decoder layer's class (`_no_split_modules`)
    layer = next((m for m in lm.modules() if isinstance(m, layer_types)), None)
    if layer is None:  # the usual estimate: 4 hidden^2 for attention, 8 hidden^2 for a 4x MLP
        linear = 12 * text.hidden_size**2
    else:
        linear = sum(weight.numel() for weight in layer.parameters() if weight.dim() == 2)
    return linear / (2 * heads * head_dim)


# relative logit change that is rounding, for the sample alone against packed (PROBE_TOLERANCE by dtype, else
# HALF_PRECISION_TOLERANCE); packed after two different samples, its logits must agree to within LEAK_TOLERANCE in
# any dtype (the keys it cannot see weigh exactly 0)
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}
HALF_PRECISION_TOLERANCE = 2e-2
LEAK_TOLERANCE = 1e-5


def keeps_samples_apart(lm: PreTrainedModel) -> bool:
    """Whether `lm` reads a packed row as separate samples: a short sample's logits packed after a longer one must
    not depend on that one, and must be those it gets alone (three forwards of at most 22 tokens, without gradients).
    Models whose attention mask ignores the position ids (OPT, Bloom, MPT, XGLM, BioGPT, ...) or whose positional
    bias does not restart with them (ALiBi) fail, and would let each sample attend to the ones before it in its row.
    Varlen flash kernels are not probed (they need an accelerator, and read the boundaries off the position ids)."""
    if (lm.config._attn_implementation or "").startswith("flash"):
        return True
    embed = lm.get_input_embeddings()
    generator = torch.Generator().manual_seed(0)
    first, second, sample = (torch.randint(embed.num_embeddings, (n,), generator=generator) for n in (16, 16, 6))
    device, modes = embed.weight.device, [(module, module.training) for module in lm.modules()]
    positions = torch.cat([torch.arange(16), torch.arange(6)])[None].to(device)  # (1, 22)

    def logits(ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:  # the sample's (6, V)
        inputs = packed_lm_inputs(lm.config, embed(ids[None].to(device)), position_ids, None)
        return lm(**inputs).logits[0, -6:].float()

    lm.eval()  # no dropout: the forwards must differ only by what the sample can see
    try:
        with torch.no_grad():
            after_first = logits(torch.cat([first, sample]), positions)
            after_second = logits(torch.cat([second, sample]), positions)
            alone = logits(sample, torch.arange(6, device=device)[None])
    finally:
        for module, training in modes:  # as each was: a frozen part may be kept in eval mode
            module.training = training
    scale = alone.abs().max().clamp(min=1e-6)
    leak = (after_first - after_second).abs().max() / scale
    restart = (after_first - alone).abs().max() / scale
    return bool(leak <= LEAK_TOLERANCE and restart <= PROBE_TOLERANCE.get(embed.weight.dtype, HALF_PRECISION_TOLERANCE))


def sample_layout(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) position ids that restart at 0 per sample -> (sample ids (B, L), positions within the sample (B, L)).

    Sample ids count 0, 1, ... along each row, as transformers' `find_packed_sequence_indices` does (a new sample
    starts wherever the position does not go up by one), but always as a tensor, also for unpacked rows."""
    position_ids = position_ids.long()
    # (B, L) True where a sample starts, but for the row's first one (the prepended value makes its step 1)
    later_starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
    return later_starts.long().cumsum(-1), position_ids


def packed_lm_inputs(config: PretrainedConfig, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                     labels: torch.Tensor | None) -> dict[str, Any]:
    """The keyword arguments for a Hugging Face causal LM on packed rows: inputs_embeds (B, L, D), position_ids
    (B, L), labels (B, L) -> the same rows with their mask made for `config`'s attention implementation."""
    attention = config._attn_implementation or "eager"
    builder = PACKED_MASKS.get(attention)
    if builder is not None:
        sample_ids, positions = sample_layout(position_ids)
        mask = builder(config, sample_ids, positions)
        return {"inputs_embeds": inputs_embeds, "attention_mask": mask, "position_ids": position_ids,
                "labels": labels, "use_cache": False}
    if attention.startswith("flash"):
        # varlen flash attention reads cu_seqlens off position ids for one row only: lay the rows end to end. Each
        # row starts a sample and a sample's first label is ignored, so the loss's shift across rows reads nothing.
        inputs_embeds = inputs_embeds.reshape(1, -1, inputs_embeds.shape[-1])  # (1, B * L, D)
        position_ids = position_ids.reshape(1, -1)  # (1, B * L)
        labels = labels.reshape(1, -1) if labels is not None else None
    # no 2D mask and no cache: transformers builds the block-diagonal causal mask from the position ids
    return {"inputs_embeds": inputs_embeds, "attention_mask": None, "position_ids": position_ids, "labels": labels,
            "use_cache": False}
