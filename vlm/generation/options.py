"""Decoding options: every knob of one answer, checked once with messages that name the option, the
`temperature="auto"` rule, and the translation into transformers' `generate` arguments."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlm.config import ConfigError, invalid_choice_message, unknown_key_message
from vlm.data.tokenizer import IMAGE_TOKEN

log = logging.getLogger("vlm.chat")

Message = dict[str, str]


class OptionError(ConfigError):
    """A generation option with a bad value; the message names the option."""


# Code requests want near-deterministic decoding (syntax punishes creativity); creative writing wants variety.
CODE_TEMPERATURE, CREATIVE_TEMPERATURE, DEFAULT_TEMPERATURE = 0.2, 0.8, 0.7
_CODE_CUES = re.compile(
    r"```|\b(code|coding|function|method|class|python|javascript|typescript|java|rust|golang|c\+\+|sql|regex|bash|"
    r"script|bug|debug|compile|compiler|stack ?trace|traceback|exception|refactor|implement|algorithm|api|json|yaml)\b",
    re.IGNORECASE,
)
_CREATIVE_CUES = re.compile(
    r"\b(poem|poems|poetry|haiku|limerick|sonnet|verse|lyrics|song|story|stories|tale|fairy ?tale|fiction|novel|"
    r"imagine|imaginative|creative|fantasy|once upon a time|screenplay|dialogue|rhyme|rhymes)\b",
    re.IGNORECASE,
)


def auto_temperature(messages: Sequence[Message]) -> tuple[float, str]:
    """Pick a sampling temperature from the latest user message: (value, reason).

    - 0.2 when it looks like a code request: a ``` fence, or words such as function, python, bug, debug, sql, regex;
    - 0.8 when it asks for creative writing: poem, story, haiku, lyrics, imagine, fiction, ...;
    - 0.7 otherwise.
    Code wins when both match ("write a python function that prints a poem" wants working code).
    """
    text = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    text = text.replace(IMAGE_TOKEN, " ")
    if found := _CODE_CUES.search(text):
        return CODE_TEMPERATURE, f"code request (matched {found.group(0)!r})"
    if found := _CREATIVE_CUES.search(text):
        return CREATIVE_TEMPERATURE, f"creative writing (matched {found.group(0)!r})"
    return DEFAULT_TEMPERATURE, "general request (no code or creative-writing cue)"


KV_CACHES = ("dynamic", "h2o")
RANKINGS = ("contribution", "max", "mean", "sum")  # how H2O orders heavy-hitter candidates
IMAGE_BLOCKS = "image"  # h2o.prompt_block: a pass per image, each ending with the image's last token


@dataclass
class H2OSettings:
    """The H2O cache's budget (vlm.generation.h2o). `heavy` and `recent` are each a token count (an integer) or a
    fraction of the prompt's length (a number with a decimal point, at most 1.0); `sinks` first tokens are always kept.
    `heavy=0` makes a recent-only window with sinks (StreamingLLM). `ranking` orders the heavy-hitter candidates:
    `contribution`, the most any query (in any head sharing the key) has drawn on the key: its share of the query's
    attention against an even spread over the keys the query read, times the norm of the key's value; `max`, the
    largest share alone; `sum`, the attention each key has received so far (the paper's); or `mean`, that sum over the
    queries that have read the key, which does not favour a key for being old. `prompt_block`: with None the prompt
    is read in one pass and the budget applies from the answer on; with N it is read N tokens at a time, evicting
    after each block, so the cache never holds more than the budget + N (1: as the paper evaluates, each prompt token
    reads only what is kept); with "image" a pass ends after each image, so an image is read whole, then evicted,
    before the words after it read it, and the words after the last image are read with the answer's first step (the
    cache holds at most the budget + the longest stretch between two image ends, or after the last)."""

    heavy: int | float = 0.1  # tokens kept for the most attention received so far
    recent: int | float = 0.1  # the newest tokens, always kept
    sinks: int = 4  # the first tokens, always kept (they draw attention whatever they say)
    ranking: str = "contribution"  # contribution, max, mean or sum: see above
    prompt_block: int | str | None = None  # None: the prompt in one pass; N: N tokens per pass; "image": per image

    def __post_init__(self) -> None:
        for name in ("heavy", "recent"):
            value = getattr(self, name)
            if _is_int(value) and value >= 0 or isinstance(value, float) and 0 <= value <= 1:
                continue
            raise OptionError(f"h2o.{name}={value!r} is not valid: use a token count (an integer >= 0) or a "
                              f"fraction of the prompt's length in [0, 1]", key=f"h2o.{name}")
        if not _is_int(self.sinks) or self.sinks < 0:
            raise OptionError(f"h2o.sinks={self.sinks!r} is not valid: use an integer >= 0", key="h2o.sinks")
        if self.recent in (0, 0.0):
            raise OptionError("h2o.recent=0 is not valid: the window must hold at least the newest token",
                              key="h2o.recent")
        if self.prompt_block not in (None, IMAGE_BLOCKS) and (not _is_int(self.prompt_block) or self.prompt_block < 1):
            raise OptionError(f"h2o.prompt_block={self.prompt_block!r} is not valid: use an integer >= 1 (tokens of "
                              f"the prompt read per pass), {IMAGE_BLOCKS!r} (a pass per image), or null to read it "
                              f"in one pass", key="h2o.prompt_block")
        if self.ranking not in RANKINGS:
            raise OptionError(invalid_choice_message("h2o.ranking", self.ranking, RANKINGS), key="h2o.ranking")


@dataclass
class GenerationOptions:
    """Decoding settings; `ChatModel.generate(..., **options)` takes any of these by name. `vlm.infer` reads them
    from the `generation` group of configs/infer.yaml, whose values match these defaults."""

    max_new_tokens: int = 256  # new tokens at most (also capped by the model's context length)
    temperature: int | float | str = "auto"  # 0: greedy; > 0: sampling; "auto": see auto_temperature()
    top_p: float | None = None  # nucleus sampling: keep the smallest set of tokens with this much probability
    top_k: int | None = None  # keep the k most likely tokens (0 disables)
    # > 1 discourages every token already in the sequence, the prompt's too (CTRL's penalty, as transformers does it)
    repetition_penalty: float | None = None
    num_beams: int = 1  # > 1: beam search (deterministic unless temperature is set > 0)
    length_penalty: float | None = None  # beam search: > 0 favours longer answers, < 0 shorter
    stop: tuple[str, ...] = ()  # stop sequences: generation ends at the first, and it is not part of the answer
    seed: int | None = None  # seeds torch's RNG before sampling, for reproducible answers
    kv_cache: str = "dynamic"  # "dynamic": every past key; "h2o": a fixed budget of heavy hitters + recent tokens
    h2o: H2OSettings = dataclasses.field(default_factory=H2OSettings)  # the h2o budget (with kv_cache="h2o")

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> OptionError:
            return OptionError(f"{name}={getattr(self, name)!r} is not valid: {rule}", key=name)

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "use an integer >= 1")
        if isinstance(self.temperature, str):
            if self.temperature.strip().lower() != "auto":
                raise bad("temperature", 'use a number >= 0 or "auto"')
            self.temperature = "auto"
        elif not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", 'use a number >= 0 or "auto"')
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 <= self.top_p <= 1):
            raise bad("top_p", "use a number in [0, 1] (0 keeps only the most likely token)")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise bad("top_k", "use an integer >= 0")
        if self.repetition_penalty is not None and (not _is_number(self.repetition_penalty)
                                                    or self.repetition_penalty <= 0):
            raise bad("repetition_penalty", "use a number > 0 (1.0 is no penalty)")
        if not _is_int(self.num_beams) or self.num_beams < 1:
            raise bad("num_beams", "use an integer >= 1")
        if self.length_penalty is not None and not _is_number(self.length_penalty):
            raise bad("length_penalty", "use a number")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "use a list of non-empty strings")
        self.stop = tuple(stop)
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise bad("seed", "use an integer from -2**63 to 2**64 - 1 (what torch.manual_seed takes)")
        if self.kv_cache not in KV_CACHES:
            raise OptionError(invalid_choice_message("kv_cache", self.kv_cache, KV_CACHES), key="kv_cache")
        self.h2o = _h2o_settings(self.h2o, H2OSettings())

    def updated(self, **overrides: Any) -> GenerationOptions:
        """A copy with the given options replaced; None means "keep this one". A dict for `h2o` changes only the
        budget keys it names."""
        names = [f.name for f in dataclasses.fields(self)]
        for name in overrides:
            if name not in names:
                raise OptionError(unknown_key_message(name, names, what="generation option"))
        if "h2o" in overrides and overrides["h2o"] is not None:
            overrides["h2o"] = _h2o_settings(overrides["h2o"], self.h2o)
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _h2o_settings(value: Any, base: H2OSettings) -> H2OSettings:
    """`value` (H2OSettings, or a dict of some of its keys laid over `base`) as checked H2OSettings."""
    if isinstance(value, H2OSettings):
        return value
    if not isinstance(value, dict):
        raise OptionError(f"h2o={value!r} is not valid: use {{'heavy': ..., 'recent': ..., 'sinks': ...}}")
    names = [f.name for f in dataclasses.fields(H2OSettings)]
    for name in value:
        if name not in names:
            raise OptionError(unknown_key_message(f"h2o.{name}", names, what="generation option"))
    return dataclasses.replace(base, **value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)  # not NaN or inf


# Sampling this cold is greedy decoding (ties aside); colder still, logits / temperature overflow to inf and the
# softmax to NaN (1e-45 does), so a temperature under it decodes greedily.
GREEDY_BELOW = 1e-5


@dataclass
class Decoding:
    """One answer's decoding, resolved: what `generate` gets besides the inputs, and what the Completion reports."""

    generate_kwargs: dict[str, Any]
    temperature: float | None  # the sampling temperature used; None for greedy or beam search
    max_new_tokens: int  # after the context-length cap


def resolve_decoding(options: GenerationOptions, messages: Sequence[Message], room: int) -> Decoding:
    """`options` for a conversation with `room` tokens of context left: "auto" temperature picked, sampling
    arguments only where sampling happens (transformers warns about unused ones)."""
    max_new = min(options.max_new_tokens, room)
    temperature = options.temperature
    if temperature == "auto":
        if options.num_beams > 1:
            temperature = 0.0  # beam search is a deterministic search; "auto" does not turn it into sampling
            log.info("temperature auto -> beam search without sampling (num_beams=%d)", options.num_beams)
        else:
            temperature, reason = auto_temperature(messages)
            log.info("temperature auto -> %.1f: %s", temperature, reason)
    sampling = float(temperature) >= GREEDY_BELOW
    kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": sampling, "num_beams": options.num_beams}
    if sampling:
        kwargs["temperature"] = float(temperature)
        if options.top_p is not None:
            kwargs["top_p"] = options.top_p
        if options.top_k is not None:
            kwargs["top_k"] = options.top_k
    if options.repetition_penalty is not None:
        kwargs["repetition_penalty"] = options.repetition_penalty
    if options.num_beams > 1 and options.length_penalty is not None:
        kwargs["length_penalty"] = options.length_penalty
    return Decoding(kwargs, float(temperature) if sampling else None, max_new)
