"""H2O heavy-hitter KV cache (Zhang et al. 2023, "Heavy-Hitter Oracle") for transformers' `generate`.

A few keys receive most of the attention. Each layer keeps, per key-value head:
- the first `sinks` tokens (always);
- the `recent` newest tokens;
- the `heavy` older tokens with the most attention accumulated so far;
and evicts everything else after every forward pass (the prompt's prefill and each decoding step), so the cache never
holds more than heavy + recent + sinks keys between steps (+1 while a step runs). With `heavy=0` it is a recent-only
window with sinks (StreamingLLM).

Heavy hitters are ranked by the most any one query has drawn on them (`ranking=contribution`, the default), by the
largest share of its attention a query has given them (`max`), by their accumulated attention (`sum`, the paper's), or
by that total over the queries that have read them (`mean`). A sum favours keys for being old, and on short image
prompts it evicts the question's last words first; a mean dilutes a key that one query needed badly among the many
that ignored it. The largest share keeps exactly those keys, but a query that reads few keys (a prompt's first
tokens) gives each a large share whatever they say, and a key with a large share and a small value (a sink, a
separator) adds little to the output. `contribution` measures each share against an even spread over the keys its
query read (share x keys read) and weighs it by the norm of the key's value, as the size of the key's term in that
query's output; it keeps the most answers on the synthetic held-out questions (see the README's budget table).

Scores are kept per key-value head: each head keeps its own heavy hitters, as in the paper, at no extra memory (every
head keeps the same number of keys). Under grouped-query attention the query heads that share a key-value head count
together (their largest share, or their sum), since they read the same stored key.

The scores come from the attention function registered here (`transformers.AttentionInterface`), which wraps the
model's own (sdpa, ...) and leaves its output untouched. A cache layer asks for them by putting itself in the attention
kwargs during `update` (the same dict reaches the attention function); during decoding the query is one token, so the
scores are one softmax row per head, and at prefill the column sums are taken over blocks of queries, never the whole
N x N matrix.

Batches: every row evicts on its own, so unpadded batches and beam search (the cache reorders its scores with its keys)
are exact. Left-padded batches are refused: masks index keys by position, which eviction no longer matches.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vlm.data.processor import run_slots
from vlm.errors import first_line
from vlm.generation.options import IMAGE_BLOCKS, H2OSettings, OptionError
from vlm.models.attention import layers_besides_attention, slides_within_own_window, uses_pattern

log = logging.getLogger(__name__)

H2O_LAYER = "h2o_cache_layer"  # attention kwarg: the layer waiting for this step's attention scores
# Prefill queries per block when summing attention columns: memory (B, H, rows, K), never (B, H, N, N). A block's
# scores stay within a budget of floats: on CPUs 4 MiB, so the softmax's passes over them run in cache; elsewhere
# 1 GiB, since kernel launches would dominate small blocks.
SCORE_BLOCK_ROWS = (16, 256)  # fewest and most queries per block
CPU_SCORE_FLOATS = 2**20
ACCELERATOR_SCORE_FLOATS = 2**28
HOOK_PREFIX = "h2o_scores+"  # the registered name is this + the wrapped implementation ("h2o_scores+sdpa")


class PaddedBatchError(ValueError):
    """H2O eviction cannot serve a left-padded batch; the message says what to do instead."""


@dataclass(frozen=True)
class H2OBudget:
    """Tokens each layer keeps: `heavy` by the attention they received (ranked by `ranking`: `contribution`, the
    default, `max`, `sum` or `mean`; see H2OSettings), the `recent` newest, the first `sinks`."""

    heavy: int
    recent: int
    sinks: int
    ranking: str = H2OSettings.ranking  # one default, the settings'
    prompt_block: int | str | None = None  # tokens per pass (evicting after each), "image", or None: one pass

    @property
    def total(self) -> int:
        return self.heavy + self.recent + self.sinks

    @classmethod
    def for_prompt(cls, settings: H2OSettings, prompt_length: int) -> H2OBudget:
        """Resolve fractions (floats) against the prompt's length; integers are token counts."""
        def tokens(value: int | float) -> int:
            return value if isinstance(value, int) else math.ceil(value * prompt_length)

        return cls(tokens(settings.heavy), tokens(settings.recent), settings.sinks, settings.ranking,
                   settings.prompt_block)


class H2OLayer(DynamicLayer):
    """One decoder layer's kept keys and values (B, H_kv, K, D), with each key's score, position and value length.

    Kept keys stay in position order: sinks first, then heavy hitters, then the recent window. `get_seq_length` is the
    number of tokens seen (evicted ones included), so `generate` keeps counting positions from there; the mask is
    built over the kept keys only (`get_mask_sizes`, `H2OCache.get_query_offset`).
    """

    is_croppable = False

    def __init__(self, budget: H2OBudget):
        super().__init__()
        self.budget = budget
        self.cumulative_length = 0  # tokens seen, evicted ones included
        self.scores = torch.zeros(0)  # (B, H_kv, K) float32: attention each kept key has received (max, lift: most)
        self.positions = torch.zeros(0, dtype=torch.long)  # (B, H_kv, K): each kept key's position in the sequence
        self.value_norms = torch.zeros(0)  # (B, H_kv, K) float32: each kept value's length (`contribution` only)
        self.awaiting_scores = False
        # (B, H_kv, K) each, kept, reordered and evicted with the keys; value lengths only where the ranking reads them
        self.per_key = ("scores", "positions") + (("value_norms",) if budget.ranking == "contribution" else ())

    def held(self) -> int:
        """Keys held now (per row and head)."""
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               kwargs: dict[str, Any] | None = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys (B, H_kv, Q, D); returns every key this step's queries read."""
        if self.awaiting_scores:
            raise RuntimeError("the H2O cache got no attention scores for the last step: the model's attention does "
                               "not go through vlm.generation.h2o's score hook (use H2OCache(model, ...))")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            batch, heads = key_states.shape[:2]
            self.scores = torch.zeros(batch, heads, 0, device=self.device)
            self.positions = torch.zeros(batch, heads, 0, dtype=torch.long, device=self.device)
            self.value_norms = torch.zeros(batch, heads, 0, device=self.device)
        self._expand_to(key_states.shape[0])
        new = key_states.shape[-2]
        new_positions = torch.arange(self.cumulative_length, self.cumulative_length + new, device=self.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)  # (B, H_kv, K + Q, D)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_positions.expand(*key_states.shape[:2], new)], dim=-1)
        self.scores = torch.cat([self.scores, self.scores.new_zeros(*key_states.shape[:2], new)], dim=-1)
        if "value_norms" in self.per_key:  # once per key, as it enters
            self.value_norms = torch.cat([self.value_norms, value_states.float().norm(dim=-1)], dim=-1)
        self.cumulative_length += new
        if kwargs is None:
            raise RuntimeError("the model's attention passes no kwargs to its cache, so H2O cannot get attention "
                               "scores; use kv_cache=dynamic with this model")
        kwargs[H2O_LAYER] = self  # the attention function checks the mask, then calls `observe` (which evicts)
        self.awaiting_scores = True
        return self.keys, self.values

    def _expand_to(self, batch: int) -> None:
        """Repeat each cached row for the `batch` rows now arriving: a prompt read before `generate` (`read_prompt`)
        was cached once per row, and `generate` then expands the rows for beams or `num_return_sequences`."""
        held_rows = self.keys.shape[0]
        if batch == held_rows or not self.held():
            return
        if batch % held_rows:
            raise RuntimeError(f"the H2O cache holds {held_rows} rows and got {batch}: not a whole number of beams or "
                               f"returned sequences per row")
        self.batch_repeat_interleave(batch // held_rows)

    @property
    def wants_scores(self) -> bool:
        return self.budget.heavy > 0  # a recent-only window needs none

    @property
    def score_reduce(self) -> str:
        """How the attention function reduces this step's scores for the ranking (see attention_column_scores)."""
        return {"max": "max", "contribution": "lift"}.get(self.budget.ranking, "sum")

    def observe(self, scores: torch.Tensor | None) -> None:
        """Add this step's attention (B, H_kv, K) to the kept keys' totals (`max`: keep the larger share;
        `contribution`: the larger lift, a share x the keys its query read), then evict down to the budget."""
        if scores is not None and self.score_reduce != "sum":  # a largest share or lift: keep the larger
            self.scores = torch.maximum(self.scores, scores)
        elif scores is not None:
            self.scores += scores
        self.awaiting_scores = False
        self.evict()

    def evict(self) -> None:
        held, budget = self.held(), self.budget
        if held <= budget.total:
            return
        batch, heads = self.keys.shape[:2]
        if held == budget.total + 1:  # a decoding step: drop the one lowest-scored candidate, as H2O does
            middle = self.ranks()[..., budget.sinks: held - budget.recent]  # (B, H_kv, heavy + 1)
            dropped = middle.argmin(dim=-1, keepdim=True) + budget.sinks  # (B, H_kv, 1)
            keep = torch.arange(held - 1, device=self.device).expand(batch, heads, -1)  # (B, H_kv, total)
            self._keep(keep + (keep >= dropped))  # every index from the dropped one on moves up by one
            return
        sinks = torch.arange(budget.sinks, device=self.device).expand(batch, heads, -1)
        recent = torch.arange(held - budget.recent, held, device=self.device).expand(batch, heads, -1)
        middle = self.ranks()[..., budget.sinks: held - budget.recent]  # (B, H_kv, M) the candidates, M > heavy
        heavy = middle.topk(budget.heavy, dim=-1).indices.sort(dim=-1).values + budget.sinks  # (B, H_kv, heavy)
        self._keep(torch.cat([sinks, heavy, recent], dim=-1))  # (B, H_kv, total), in position order

    def ranks(self) -> torch.Tensor:
        """What heavy hitters are chosen by (B, H_kv, K): the largest lift times the value's length (`contribution`),
        the largest share of a query's attention (`max`), the accumulated attention (`sum`), or (`mean`) that total
        over the queries that have read each key. Every token from a key's position on read it while it was kept
        (causal, and an evicted key never returns), so that count is the tokens seen minus its position. Summed totals
        favour old keys: of an N-token prompt, key j is read by N - j of its queries, so the question's last words
        lose."""
        if self.budget.ranking == "contribution":
            return self.scores * self.value_norms  # the largest lift x the value's length: the term's size
        if self.budget.ranking != "mean":
            return self.scores
        return self.scores / (self.cumulative_length - self.positions)

    def _keep(self, keep: torch.Tensor) -> None:
        """Keep the entries `keep` (B, H_kv, total) of every row and head."""
        rows = keep.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])  # (B, H_kv, total, D)
        self.keys, self.values = self.keys.gather(2, rows), self.values.gather(2, rows)
        for name in self.per_key:
            setattr(self, name, getattr(self, name).gather(2, keep))

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask spans the kept keys plus this step's (the cache's query offset is the kept count)."""
        return self.held() + query_length, 0

    def get_max_length(self) -> int:
        return -1  # positions are not capped; only what is held is

    def reset(self) -> None:
        super().reset()
        self.scores, self.positions, self.value_norms = torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0)
        self.awaiting_scores = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an H2O cache has evicted keys and cannot be rolled back (no assisted decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)  # beam search: the scores and positions follow their keys
        if self.held():
            beam_idx = beam_idx.to(self.device)
            for name in self.per_key:
                setattr(self, name, getattr(self, name).index_select(0, beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.held():
            for name in self.per_key:
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.held():
            for name in self.per_key:
                setattr(self, name, getattr(self, name)[indices])


class H2OCache(Cache):
    """An H2O layer per decoder layer of `lm`; installs the score hook on `lm` (see `install_score_hook`)."""

    def __init__(self, lm: PreTrainedModel, budget: H2OBudget, cancel: threading.Event | None = None):
        install_score_hook(lm)
        super().__init__(layers=[H2OLayer(budget) for _ in range(lm.config.get_text_config().num_hidden_layers)])
        self.budget = budget
        self.cancel = cancel  # set (Ctrl-C, a client gone): `read_prompt` stops between passes

    @torch.no_grad()
    def read_prompt(self, lm: PreTrainedModel, inputs_embeds: torch.Tensor, image_tokens: torch.Tensor | None = None,
                    image_slots: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> bool:
        """Read the start of the prompt's (B, L, D) embeddings into the cache in passes, evicting after each;
        `generate` then finds them cached and reads the rest in its first pass. False when `cancel` was set before
        the last pass: the answer is not to be generated.

        With `budget.prompt_block` = N, all but the last token, N tokens per pass, so no prompt token reads a key the
        budget has dropped and the cache never holds more than the budget + N. With `prompt_block="image"`, up to the
        last image's end, a pass ending after each image's last token (in any row of `image_tokens`, (B, L) bool;
        `image_slots` (N_image_tokens,) tells adjacent images apart, as in VisionLanguageModel.embed): every image is
        read whole, then evicted, before the words after it read it. Without a block size this does nothing:
        `generate` reads the whole prompt at once and the budget applies from then on. A left-padded batch
        (`attention_mask` (B, L) with zeros) is refused: the passes read no mask."""
        block = self.budget.prompt_block
        if block is None or self.get_seq_length():
            return True
        _refuse_padding(attention_mask, inputs_embeds.shape[1])
        last = inputs_embeds.shape[1] - 1  # generate reads at least the last token
        if block == IMAGE_BLOCKS:
            ends = image_ends(image_tokens, image_slots) if image_tokens is not None else []
            ends = [end for end in ends if end <= last]
        else:
            ends = [*range(block, last, block), last] if last else []
        start = 0
        for end in ends:
            if self.cancel is not None and self.cancel.is_set():  # a long prompt read a token a pass takes a while
                return False
            lm(inputs_embeds=inputs_embeds[:, start:end], cache=self, use_cache=True, logits_to_keep=1)
            start = end
        return True

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Masks count positions among the kept keys, so a query comes right after them (not after every token
        seen): a causal mask then never lets a prompt block read its own later tokens."""
        return self.layers[layer_idx].held() if layer_idx < len(self.layers) else 0


def image_ends(image_tokens: torch.Tensor, image_slots: torch.Tensor | None = None) -> list[int]:
    """Positions just after each image's last token in any row of `image_tokens` (B, L) bool, ascending. `image_slots`
    (N_image_tokens,) numbers each image token's image within its row; without it each run of image tokens is one
    image (two images written side by side, `<image><image>`, are then one run)."""
    if image_slots is None:
        image_slots = run_slots(image_tokens)
    image = torch.full(image_tokens.shape, -1, dtype=torch.long, device=image_tokens.device)  # (B, L): -1 for text
    image[image_tokens] = image_slots.to(image.device)
    last = image_tokens & (image != F.pad(image[:, 1:], (0, 1), value=-1))  # (B, L): an image's last token
    return (last.any(dim=0).nonzero().flatten() + 1).tolist()


def score_block(heads: int, keys: int, device: torch.device) -> int:
    """Prompt queries per block of `attention_column_scores`: as many as the device's float budget allows for `heads`
    rows of `keys` scores each, within SCORE_BLOCK_ROWS."""
    budget = CPU_SCORE_FLOATS if device.type == "cpu" else ACCELERATOR_SCORE_FLOATS
    fewest, most = SCORE_BLOCK_ROWS
    return max(fewest, min(most, budget // (heads * keys)))


def attention_column_scores(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float, reduce: str = "sum", block: int | None = None) -> torch.Tensor:
    """Attention each key receives over the queries and the query heads sharing its key-value head: summed
    (`reduce="sum"`), its largest share (`"max"`), or its largest lift (`"lift"`: a share times the number of keys
    its query read, i.e. against an even spread, so a query that reads three keys does not give each a third for
    reading them at all).

    query (B, H, Q, D), key (B, H_kv, K, D), the queries being the last Q of the K positions; attention_mask None
    (causal) or the model's 4D mask (B, 1, Q, >=K), boolean (True attends) or additive; `block` queries per pass
    (default: `score_block`). Returns (B, H_kv, K) float32.
    """
    batch, heads, queries, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    block = block or score_block(heads, keys, key.device)
    key32 = key.float()
    totals = torch.zeros(batch, kv_heads, keys, device=key.device)
    for start in range(0, queries, block):
        end = min(start + block, queries)
        rows = end - start
        # causal without a mask: this block's last query sees keys up to K - Q + end - 1; the rest are never read
        visible = keys - queries + end if attention_mask is None else keys
        q = query[:, :, start:end].float().view(batch, kv_heads, groups, rows, dim) * scaling  # (B, H_kv, G, c, D)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", q, key32[:, :, :visible])  # (B, H_kv, G, c, V)
        mask = None if attention_mask is None else attention_mask[:, :, start:end, :keys].unsqueeze(1)  # (B,1,1,c,K)
        if mask is not None:
            logits = logits.masked_fill_(~mask, -math.inf) if mask.dtype == torch.bool else logits.add_(mask)
        elif rows > 1:  # causal: query i of the block reads the block's last `rows` keys up to its own, i
            later = torch.ones(rows, rows, dtype=torch.bool, device=key.device).triu_(1)  # (c, c)
            logits[..., visible - rows:].masked_fill_(later, -math.inf)
        # softmax in place (one (B, H_kv, G, c, V) buffer per block); each row's normaliser is applied in the
        # query-weighted sum over the block's rows rather than by a division pass
        logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        inverse_norm = logits.sum(dim=-1).reciprocal_()  # (B, H_kv, G, c)
        if reduce in ("max", "lift"):
            weights = inverse_norm.unsqueeze(-1)  # (B, H_kv, G, c, 1)
            if reduce == "lift":
                weights = weights * _keys_read(mask, rows, visible, key.device)
            shares = logits.mul_(weights).amax(dim=(2, 3))  # (B, H_kv, V)
            totals[..., :visible] = torch.maximum(totals[..., :visible], shares)
        else:
            totals[..., :visible] += torch.einsum("bhgq,bhgqk->bhk", inverse_norm, logits)
    return totals


def _keys_read(block_mask: torch.Tensor | None, rows: int, visible: int, device: torch.device) -> torch.Tensor:
    """How many keys each of a block's `rows` queries reads: (c, 1) when causal without a mask (the block's last query
    reads `visible`), else (B, 1, 1, c, 1) from the block's mask (B, 1, 1, c, K), boolean (True attends) or additive."""
    if block_mask is None:
        return torch.arange(visible - rows + 1, visible + 1, dtype=torch.float32, device=device).unsqueeze(-1)
    attends = block_mask if block_mask.dtype == torch.bool else block_mask > torch.finfo(block_mask.dtype).min
    return attends.sum(dim=-1, keepdim=True).float()


def _refuse_padding(attention_mask: torch.Tensor | None, keys: int) -> None:
    """Without padding the last query of a step reads every key; a padded row hides some from it. Masks are 4D
    (sdpa, eager: boolean or additive) or a 2D padding mask (flash attention)."""
    if attention_mask is None:
        return
    last = attention_mask[:, :, -1, :keys] if attention_mask.dim() == 4 else attention_mask  # (B, 1, K) or (B, K)
    reads_all = bool(last.all()) if last.dtype == torch.bool or attention_mask.dim() == 2 else bool((last == 0).all())
    if not reads_all:
        raise PaddedBatchError("kv_cache=h2o cannot evict in a left-padded batch (masks index keys by position); "
                               "generate one prompt at a time, or batch prompts of equal length")


def _observing(wrapped: Callable) -> Callable:
    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any):
        layer: H2OLayer | None = kwargs.pop(H2O_LAYER, None)
        if layer is not None and query.shape[-2] > 1:  # padding comes with the prompt: decoding steps add none
            _refuse_padding(attention_mask, key.shape[-2])
        output = wrapped(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if layer is not None and not layer.wants_scores:
            layer.observe(None)
        elif layer is not None:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            with torch.no_grad():
                # a 2D mask (flash attention) is all ones, as padding is refused
                mask = attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None
                layer.observe(attention_column_scores(query, key, mask, scale, layer.score_reduce))
        return output

    return attention


def refuse_pattern(lm: PreTrainedModel) -> None:
    """H2O evicts by attention mass; a local + global model already keeps only the keys its pattern reads, and H2O's
    held-key masks would break that pattern."""
    if uses_pattern(lm) is not None:
        raise OptionError("kv_cache='h2o' does not combine with a model trained with model.llm.attention="
                          "local_global (it already keeps only the keys its pattern reads); use kv_cache='dynamic'")


class _ScoreProbe(DynamicLayer):
    """A cache layer that notes whether the model's attention hands it its kwargs, and then calls the registered
    attention function with them (whose score hook reports back through `observe`): H2O's way to the scores."""

    wants_scores, score_reduce = True, "sum"  # one token's scores: cheap

    def __init__(self):
        super().__init__()
        self.got_kwargs = False
        self.cached_heads = self.scored_heads = 0  # 0 scored heads: the score hook never ran

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               kwargs: dict[str, Any] | None = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if kwargs is not None:
            self.got_kwargs = True
            kwargs[H2O_LAYER] = self
        self.cached_heads = key_states.shape[1]  # key_states (B, H_cached, L, D)
        return super().update(key_states, value_states)

    def observe(self, scores: torch.Tensor | None) -> None:
        self.scored_heads = scores.shape[1]  # scores (B, H_kv, K): one per key head attention read


def refuse_unsupported(lm: PreTrainedModel) -> None:
    """Raise OptionError (before any text streams) for a model H2O cannot run on: a local + global one, one that
    runs eager attention only (Gemma 2's soft-capping), or one whose attention does not pass its kwargs to the cache
    (GPT-NeoX, Falcon, Bloom). The verdict is kept on the model: one 1-token forward finds it."""
    refuse_pattern(lm)
    verdict = getattr(lm, "_vlm_h2o_problem", None)
    if verdict is None:
        verdict = _unsupported_reason(lm)
        lm._vlm_h2o_problem = verdict
    if verdict:
        raise OptionError(f"kv_cache='h2o' cannot run on {type(lm).__name__}: {verdict}; use kv_cache='dynamic'",
                          key="kv_cache")


def _unsupported_reason(lm: PreTrainedModel) -> str:
    config = lm.config.get_text_config()
    if others := layers_besides_attention(config):
        return f"it has {', '.join(others)} layers besides attention (layer_types), whose state H2O's cache does " \
               f"not hold"
    if slides_within_own_window(config):  # their masks count the window in positions, which kept keys no longer are
        return "it has sliding-window attention layers, whose window H2O's evicted cache cannot keep"
    try:
        install_score_hook(lm)
    except ValueError as err:  # transformers refuses the attention implementation the hook wraps
        log.debug("H2O score hook refused: %s", err)
        return "transformers runs it with its own eager attention only, not the sdpa H2O's score hook wraps"
    probes = [_ScoreProbe() for _ in range(config.num_hidden_layers)]
    token = torch.zeros(1, 1, dtype=torch.long, device=lm.device)
    try:
        with torch.no_grad():
            lm(input_ids=token, cache=Cache(layers=probes), use_cache=True)
    except Exception as err:  # a model that needs a cache of its own kind, whatever it raises then
        return f"it cannot run on H2O's cache of attention keys ({first_line(err)[:200]})"
    if not all(probe.got_kwargs for probe in probes):
        return "its attention does not pass its arguments to the KV cache, where H2O gets the attention scores"
    if not all(probe.scored_heads for probe in probes):  # MPT, XGLM: the cache is handed the arguments, then unused
        return "its attention is computed in its own code, not through the registered attention function that " \
               "H2O's score hook wraps"
    if any(probe.cached_heads != probe.scored_heads for probe in probes):  # DeepSeek's multi-head latent attention
        return "its cache holds something other than the keys its attention reads (a compressed latent), so the " \
               "scores do not say which cached entries to keep"
    return ""


def install_score_hook(lm: PreTrainedModel) -> str:
    """Switch `lm` to its own attention wrapped by the score hook; idempotent, safe while other threads generate
    (without an H2O cache in the kwargs the hook is the wrapped function). Returns the registered name."""
    refuse_pattern(lm)
    current = lm.config._attn_implementation
    if current.startswith(HOOK_PREFIX):
        return current
    base = current if current in ALL_ATTENTION_FUNCTIONS and current in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"
    name = HOOK_PREFIX + base
    AttentionInterface.register(name, _observing(ALL_ATTENTION_FUNCTIONS[base]))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])  # without one, masks are dropped
    lm.set_attn_implementation(name)
    return name
