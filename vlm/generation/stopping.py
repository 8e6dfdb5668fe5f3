"""When an answer ends: cancellation, stop sequences inside the answer, and the stop reason reported for it."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria

# the Messages API's names; model_context_window_exceeded: the answer filled the context before max_new_tokens
STOP_REASONS = ("end_turn", "max_tokens", "model_context_window_exceeded", "stop_sequence", "cancelled")


def turn_end_ids(tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS and the LLM's own end-of-turn ids (an id or a list in its
    generation config; Gemma's `<end_of_turn>` is there and not the tokenizer's EOS). Chat, validation answers and the
    Hugging Face export all stop at these."""
    configured = generation_config.eos_token_id
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    return sorted(i for i in ids if i is not None)


def through_first_end(ids: Sequence[int], end_ids: set[int] | Sequence[int]) -> list[int]:
    """An answer's ids up to and including its first end-of-turn token: after it come padding or, with beams, more."""
    end = next((i for i, token in enumerate(ids) if token in end_ids), None)
    return list(ids) if end is None else list(ids[: end + 1])


def answer_texts(new_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase, end_ids: Sequence[int]) -> list[str]:
    """Each row of a batch's new tokens (B, T_new) as text, through its first end-of-turn token, as a chat answer
    is decoded: what a batch pads or a beam adds after it never reaches the text."""
    ends = set(end_ids)
    return [tokenizer.decode(through_first_end(row, ends), skip_special_tokens=True) for row in new_ids.tolist()]


class Cancelled(StoppingCriteria):
    """Ends `generate` at the next step once `event` is set (Ctrl-C, a client that went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class StopInAnswer(StoppingCriteria):
    """Ends `generate` once the answer so far contains a stop sequence.

    transformers' `stop_strings` also matches text that begins in the prompt: with stop "\n\n" and a chat template
    whose generation prompt ends in "\n", a first "\n" would end the answer. Only the new tokens are decoded here,
    and only the last few, enough to hold the longest stop sequence.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, list(stops), prompt_length
        # in tokens: a token decodes to at least one byte, not one character (byte-level BPE spells "日" in up to
        # three tokens), and 2 more for a partial character at each end
        self.window = max(len(stop.encode("utf-8")) for stop in self.stops) + 2

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        answers = input_ids[:, self.prompt_length:]  # (B, T_new)
        return torch.tensor([any(stop in self._tail(row) for stop in self.stops) for row in answers],
                            device=input_ids.device)

    def _tail(self, answer: torch.Tensor) -> str:
        """The text of an answer's last `window` tokens (T_new,), within the answer as shown: from its first token
        that is not whitespace alone, without the whitespace that opens it (`cut_answer`)."""
        visible = next((i for i in range(len(answer))
                        if self.tokenizer.decode(answer[i:i + 1], skip_special_tokens=True).strip()), len(answer))
        first = max(visible, len(answer) - self.window)
        tail = self.tokenizer.decode(answer[first:], skip_special_tokens=True)
        return tail.lstrip() if first == visible else tail


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Text up to the earliest stop sequence, and which one; (text, None) when none occurs."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return (text, None) if best is None else (text[: best[0]], best[1])


def cut_answer(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """An answer as it is shown: from its first character that is not whitespace (a model may open with a newline
    or a space) up to the earliest stop sequence, and which one."""
    return cut_at_stop(text.lstrip(), stops)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the beginning of a stop sequence."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class StopScanner:
    """Streams text through stop sequences: `feed` returns what can be shown now, from the answer's first character
    that is not whitespace (as `cut_answer`), holding back any end that might be the start of a stop sequence; once
    one appears, `stop` names it and nothing more comes out."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.stop: str | None = None
        self.begun = False  # whether the answer's first character that is not whitespace has come

    def feed(self, piece: str) -> str:
        if self.stop is not None:
            return ""
        if not self.begun:
            piece = piece.lstrip()
            self.begun = bool(piece)
        self.pending += piece
        cut, self.stop = cut_at_stop(self.pending, self.stops)
        if self.stop is not None:
            self.pending = ""
            return cut
        keep = _held_back(self.pending, self.stops)
        ready, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return ready

    def flush(self) -> str:
        """What was held back, at the end of the text (nothing after a stop sequence)."""
        rest, self.pending = self.pending, ""
        return rest if self.stop is None else ""


def stop_reason(ids: Sequence[int], eos_ids: set[int], stop: str | None, cancelled: bool, max_new: int,
                context_bound: bool = False) -> str:
    """Why an answer of `ids` ended; a stop sequence or end-of-turn token wins over a cancel that came after it.
    `context_bound`: `max_new` is the context's room, less than the max_new_tokens asked for."""
    if stop is not None:
        return "stop_sequence"
    if ids and ids[-1] in eos_ids:
        return "end_turn"
    if cancelled:
        return "cancelled"
    if len(ids) >= max_new:
        return "model_context_window_exceeded" if context_bound else "max_tokens"
    return "end_turn"
