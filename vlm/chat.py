"""The chat API: load an export once, then answer conversations with images, whole or as a stream of text pieces.

`vlm.infer` (terminal) and `vlm.serve` (HTTP) are thin layers over this module. It owns:
- `ChatModel`: an align/sft export on a device, plus `prepare` (the shared processor: tiler + chat template),
  `generate` and `stream`. Decoding is transformers' `generate` with its KV cache; streaming uses
  `TextIteratorStreamer` with `generate` on a worker thread. Nothing here samples by hand.
- `GenerationOptions`: every decoding knob, checked once with messages that name the option.
- `auto_temperature`: the "adaptive sampling" heuristic behind `temperature="auto"`.
- `ChatSession`: history and images over several turns.

A conversation is `[{"role": "system"|"user"|"assistant", "content": str}]`; the text holds one `<image>`
placeholder per image, and `images` lists the image sources (paths, bytes or PIL images) in placeholder order.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from vlm.data.processor import Encoded, ImageSource, Processor, SampleError, pad_batch
from vlm.data.tiler import Tiler
from vlm.data.tokenizer import IMAGE_TOKEN

log = logging.getLogger(__name__)

Message = dict[str, str]
STOP_REASONS = ("end_turn", "max_tokens", "stop_sequence", "cancelled")


class PromptError(ValueError):
    """A conversation the model cannot answer as given (too long, placeholders and images disagree, ...)."""


class OptionError(ValueError):
    """A generation option with a bad value; the message names the option."""


# ---- temperature="auto" ----

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


# ---- options ----


@dataclass
class GenerationOptions:
    """Decoding settings; `ChatModel.generate(..., **options)` takes any of these by name."""

    max_new_tokens: int = 256  # new tokens at most (also capped by the model's context length)
    temperature: float | str = "auto"  # 0: greedy; > 0: sampling; "auto": see auto_temperature()
    top_p: float | None = None  # nucleus sampling: keep the smallest set of tokens with this much probability
    top_k: int | None = None  # keep the k most likely tokens (0 disables)
    repetition_penalty: float | None = None  # > 1 discourages repeating the answer's own tokens (CTRL-style)
    num_beams: int = 1  # > 1: beam search (deterministic unless temperature is set > 0)
    length_penalty: float | None = None  # beam search: > 0 favours longer answers, < 0 shorter
    stop: tuple[str, ...] = ()  # stop sequences: generation ends at the first, and it is not part of the answer
    seed: int | None = None  # seeds torch's RNG before sampling, for reproducible answers

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> OptionError:
            return OptionError(f"{name}={getattr(self, name)!r} is not valid: {rule}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "use an integer >= 1")
        if isinstance(self.temperature, str):
            if self.temperature.strip().lower() != "auto":
                raise bad("temperature", 'use a number >= 0 or "auto"')
            self.temperature = "auto"
        elif not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", 'use a number >= 0 or "auto"')
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise bad("top_p", "use a number in (0, 1]")
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
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "use an integer")

    def updated(self, **overrides: Any) -> GenerationOptions:
        """A copy with the given options replaced; None means "keep this one"."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise OptionError(f"unknown generation option {unknown[0]!r}; valid options: {sorted(names)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value  # not NaN


# ---- results ----


@dataclass
class Completion:
    """One answer. `output_tokens` counts every generated token, including the end-of-turn token."""

    text: str
    stop_reason: str  # "end_turn" | "max_tokens" | "stop_sequence" | "cancelled"
    input_tokens: int  # prompt tokens, image tokens included
    output_tokens: int
    stop_sequence: str | None = None  # which stop sequence ended it
    token_ids: list[int] = field(default_factory=list)  # the generated ids (what output_tokens counts)
    temperature: float | None = None  # the temperature used; None for greedy or beam search


@dataclass
class Prompt:
    """A conversation encoded by the processor, ready for `generate` / `stream`."""

    messages: list[Message]
    encoded: Encoded

    @property
    def input_tokens(self) -> int:
        return len(self.encoded.input_ids)


class _Cancelled(StoppingCriteria):
    """Ends `generate` at the next step once `event` is set (Ctrl-C, a client that went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _StopInAnswer(StoppingCriteria):
    """Ends `generate` once the answer so far contains a stop sequence.

    transformers' `stop_strings` also matches text that begins in the prompt: with stop "\n\n" and a chat template
    whose generation prompt ends in "\n", a first "\n" would end the answer. Only the new tokens are decoded here,
    and only the last few, enough to hold the longest stop sequence.
    """

    def __init__(self, tokenizer, stops: Sequence[str], prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, list(stops), prompt_length
        self.window = max(len(stop) for stop in self.stops) + 2  # tokens; each decodes to >= 1 character

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        answers = input_ids[:, self.prompt_length:]  # (B, T_new)
        tails = self.tokenizer.batch_decode(answers[:, -self.window:], skip_special_tokens=True)
        return torch.tensor([any(stop in tail for stop in self.stops) for tail in tails], device=input_ids.device)


class TextStream(Iterator[str]):
    """Text pieces of one answer as they are generated.

    Iterate it; once it is exhausted `completion` holds the whole answer, its stop reason and token counts.
    `cancel()` (or `close()`, or leaving a `with` block) stops the generation at the next token.
    """

    def __init__(self, pieces: Callable[[TextStream], Iterator[str]], cancel: threading.Event):
        self.completion: Completion | None = None  # set by the pieces generator when it ends
        self._cancel = cancel
        self._pieces = pieces(self)

    def __next__(self) -> str:
        return next(self._pieces)

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        """Stop the generation and wait for its thread; `completion` then holds what was generated."""
        self._cancel.set()
        self._pieces.close()  # type: ignore[attr-defined]

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def text(self) -> str:
        """Drain the stream and return the whole answer."""
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion.text


# ---- the model ----


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # bf16 halves memory and is what GPUs are fast at; CPUs stay in float32 (bf16 matmuls are slow there)
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise OptionError(f"dtype={dtype!r} is not valid; choose one of {sorted(names)} or 'auto'")
    return names[dtype]


class ChatModel:
    """An align/sft export ready to chat. Load once with `ChatModel.load(path)`; safe to share between threads.

    Concurrent calls each run their own `generate`. `seed` seeds torch's global RNG, so a seeded answer is
    reproducible when no other sampling runs in the same process at the same time.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, processor: Processor, device: torch.device,
                 name: str = "vlm", defaults: GenerationOptions | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self.defaults = defaults or GenerationOptions()
        lm_config = model.lm.config
        self.context_length: int = int(getattr(lm_config, "max_position_embeddings", None)
                                       or getattr(lm_config, "n_positions", None) or processor.max_length)
        # The training max_length caps training samples; a prompt may use the model's whole context. Truncating a
        # prompt would cut its generation prompt, so `prepare` refuses prompts that do not fit instead.
        self.processor = Processor(tokenizer, processor.tiler, self.context_length)
        self.eos_token_ids = self._eos_ids()

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
             name: str | None = None) -> ChatModel:
        """Load an export folder written by `vlm.train` (stage align or sft) onto `device` (default: cuda if any)."""
        from vlm.loading import load_vlm

        bundle = load_vlm(path)
        target = pick_device(device)
        model = bundle.model.to(device=target, dtype=_pick_dtype(dtype, target))
        log.info("loaded %s on %s (%s)", path, target, next(model.parameters()).dtype)
        return cls(model, bundle.tokenizer, bundle.processor, target, name=name or Path(path).expanduser().name)

    def with_image_limit(self, max_pixels: int) -> ChatModel:
        """The same weights, with a stricter decompression-bomb guard (the server refuses huge images early)."""
        tiler = self.processor.tiler
        config = dataclasses.replace(tiler.config, max_pixels=min(max_pixels, tiler.config.max_pixels))
        limited = Tiler(config, tiler.tile_size, tiler.tokens_per_tile, tiler.mean, tiler.std)
        clone = object.__new__(ChatModel)
        clone.__dict__.update(self.__dict__)
        clone.processor = Processor(self.tokenizer, limited, self.context_length)
        return clone

    def _eos_ids(self) -> set[int]:
        """Every id that ends a turn: the tokenizer's EOS and the model's generation-config EOS (a list or an id)."""
        ids = {self.tokenizer.eos_token_id}
        configured = self.model.lm.generation_config.eos_token_id
        ids.update(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    def options(self, **overrides: Any) -> GenerationOptions:
        return self.defaults.updated(**overrides)

    # ---- prompts ----

    def prepare(self, messages: Sequence[Message], images: Sequence[ImageSource] = ()) -> Prompt:
        """Encode a conversation for generation. Raises PromptError, or ImageLoadError for an unreadable image."""
        messages = [dict(m) for m in messages]
        if not messages:
            raise PromptError("the conversation is empty; send at least one user message")
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise PromptError(f"message {i} must be {{'role': 'system'|'user'|'assistant', 'content': str}}, "
                                  f"got {m!r:.120}")
        try:
            encoded = self.processor.prompt(messages, list(images))
        except SampleError as err:
            raise PromptError(str(err).removeprefix("request: ")) from None
        if len(encoded.input_ids) >= self.context_length:
            raise PromptError(f"the conversation is at least {len(encoded.input_ids)} tokens (images included) and "
                              f"the model's context is {self.context_length}; shorten it or start a new chat")
        return Prompt(messages, encoded)

    def _as_prompt(self, messages: Sequence[Message] | Prompt, images: Sequence[ImageSource]) -> Prompt:
        return messages if isinstance(messages, Prompt) else self.prepare(messages, images)

    # ---- generation ----

    def _generate_kwargs(self, prompt: Prompt, opts: GenerationOptions, cancel: threading.Event
                         ) -> tuple[dict[str, Any], float | None, int]:
        batch = pad_batch([prompt.encoded], self.tokenizer.pad_token_id, left=True)
        vision_dtype = next(self.model.vision.parameters()).dtype
        kwargs: dict[str, Any] = {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
            "pixel_values": batch["pixel_values"].to(self.device, vision_dtype),
            "image_slots": batch["image_slots"].to(self.device),
        }
        max_new = min(opts.max_new_tokens, self.context_length - prompt.input_tokens)
        temperature = opts.temperature
        if temperature == "auto":
            if opts.num_beams > 1:
                temperature = 0.0  # beam search is a deterministic search; "auto" does not turn it into sampling
                log.info("temperature auto -> beam search without sampling (num_beams=%d)", opts.num_beams)
            else:
                temperature, reason = auto_temperature(prompt.messages)
                log.info("temperature auto -> %.1f: %s", temperature, reason)
        sampling = float(temperature) > 0
        kwargs.update(
            max_new_tokens=max_new, do_sample=sampling, num_beams=opts.num_beams,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.eos_token_ids),
            stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
        )
        if sampling:
            kwargs["temperature"] = float(temperature)
            if opts.top_p is not None:
                kwargs["top_p"] = opts.top_p
            if opts.top_k is not None:
                kwargs["top_k"] = opts.top_k
        if opts.repetition_penalty is not None:
            kwargs["repetition_penalty"] = opts.repetition_penalty
        if opts.num_beams > 1 and opts.length_penalty is not None:
            kwargs["length_penalty"] = opts.length_penalty
        if opts.stop:
            kwargs["stopping_criteria"].append(_StopInAnswer(self.tokenizer, opts.stop, kwargs["input_ids"].shape[1]))
        return kwargs, (float(temperature) if sampling else None), max_new

    def _run(self, kwargs: dict[str, Any], seed: int | None) -> list[int]:
        if seed is not None:
            torch.manual_seed(seed)  # seeds the CPU and every CUDA device
        out = self.model.generate(**kwargs)  # (1, T_new): only the new tokens
        ids = out[0].tolist()
        for i, token in enumerate(ids):  # cut at the first end-of-turn token (beams may pad after it)
            if token in self.eos_token_ids:
                return ids[: i + 1]
        return ids

    def _finish(self, prompt: Prompt, ids: list[int], text: str, opts: GenerationOptions, max_new: int,
                temperature: float | None, cancelled: bool, stop: str | None = None) -> Completion:
        if stop is None:
            text, stop = _cut_at_stop(text, opts.stop)
        if stop is not None:
            reason = "stop_sequence"
        elif ids and ids[-1] in self.eos_token_ids:
            reason = "end_turn"
        elif cancelled:
            reason = "cancelled"
        elif len(ids) >= max_new:
            reason = "max_tokens"
        else:
            reason = "end_turn"
        return Completion(text, reason, prompt.input_tokens, len(ids), stop, ids, temperature)

    def generate(self, messages: Sequence[Message] | Prompt, images: Sequence[ImageSource] = (), *,
                 cancel: threading.Event | None = None, **options: Any) -> Completion:
        """Answer a conversation (or a `Prompt` from `prepare`). `options` are GenerationOptions fields."""
        opts = self.options(**options)
        prompt = self._as_prompt(messages, images)
        cancel = cancel or threading.Event()
        kwargs, temperature, max_new = self._generate_kwargs(prompt, opts, cancel)
        ids = self._run(kwargs, opts.seed)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return self._finish(prompt, ids, text, opts, max_new, temperature, cancel.is_set())

    def stream(self, messages: Sequence[Message] | Prompt, images: Sequence[ImageSource] = (), *,
               cancel: threading.Event | None = None, on_done: Callable[[Completion], None] | None = None,
               **options: Any) -> TextStream:
        """Like `generate`, but returns a TextStream of text pieces as the tokens are generated.

        The pieces concatenate to `completion.text`: a piece that might be the start of a stop sequence is held back
        until it is clear. Beam search cannot stream (the best beam is only known at the end): it yields one piece.
        `on_done(completion)` runs when the stream ends, however it ends.
        """
        opts = self.options(**options)
        prompt = self._as_prompt(messages, images)
        cancel = cancel or threading.Event()
        return TextStream(lambda stream: self._pieces(prompt, opts, cancel, stream, on_done), cancel)

    def _pieces(self, prompt: Prompt, opts: GenerationOptions, cancel: threading.Event, stream: TextStream,
                on_done: Callable[[Completion], None] | None) -> Iterator[str]:
        if opts.num_beams > 1:
            completion = self.generate(prompt, cancel=cancel, **dataclasses.asdict(opts))
            stream.completion = completion
            try:
                if completion.text:
                    yield completion.text
            finally:
                if on_done:
                    on_done(completion)
            return
        kwargs, temperature, max_new = self._generate_kwargs(prompt, opts, cancel)
        # skip_prompt drops the prompt ids that generate hands the streamer first
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["ids"] = self._run({**kwargs, "streamer": streamer}, opts.seed)
            except BaseException as err:  # hand it to the reader, and never leave it blocked on the queue
                result["error"] = err
                streamer.end()

        thread = threading.Thread(target=work, name="vlm-generate", daemon=True)
        scanner = StopScanner(opts.stop)
        emitted: list[str] = []
        finished = False
        try:
            thread.start()  # inside the try: a Ctrl-C from here on still stops and joins the thread
            for piece in streamer:
                if cancel.is_set():
                    continue  # drain: generate ends within a step
                if ready := scanner.feed(piece):
                    emitted.append(ready)
                    yield ready
            finished = True
            thread.join()
            if "error" in result:
                raise result["error"]
            if (rest := scanner.flush()) and not cancel.is_set():
                emitted.append(rest)
                yield rest
        finally:
            if not finished:
                cancel.set()  # the reader left early (Ctrl-C, a closed stream): stop generating
            if thread.ident is not None:
                thread.join()
            stream.completion = self._finish(prompt, result.get("ids", []), "".join(emitted), opts, max_new,
                                             temperature, cancel.is_set(), scanner.stop)
            if on_done:
                on_done(stream.completion)

    def session(self, system: str | None = None, **options: Any) -> ChatSession:
        return ChatSession(self, system=system, **options)


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Text up to the earliest stop sequence, and which one; (text, None) when none occurs."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return (text, None) if best is None else (text[: best[0]], best[1])


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
    """Streams text through stop sequences: `feed` returns what can be shown now, holding back any end that might
    be the start of a stop sequence; once one appears, `stop` names it and nothing more comes out."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.stop: str | None = None

    def feed(self, piece: str) -> str:
        if self.stop is not None:
            return ""
        self.pending += piece
        cut, self.stop = _cut_at_stop(self.pending, self.stops)
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


# ---- multi-turn ----


@dataclass
class _Turn:
    role: str
    content: str
    images: list[ImageSource]


class ChatSession:
    """A conversation that remembers its turns and their images.

    `send(text, images=[...])` answers and records both turns; `stream(...)` does the same piece by piece. When
    `text` has no `<image>` placeholder, one per image is put at the start of the message. When the history no
    longer fits the context, the oldest exchanges are dropped (logged).
    """

    def __init__(self, model: ChatModel, system: str | None = None, **options: Any):
        self.model = model
        self.system = system
        self.options = model.options(**options)
        self.turns: list[_Turn] = []

    @property
    def messages(self) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": t.role, "content": t.content} for t in self.turns]

    @property
    def images(self) -> list[ImageSource]:
        return [image for t in self.turns for image in t.images]

    def reset(self) -> None:
        """Forget every turn (the system prompt and options stay)."""
        self.turns.clear()

    def _prepare(self, text: str, images: Sequence[ImageSource]) -> Prompt:
        images = list(images)
        if images and IMAGE_TOKEN not in text:
            text = f"{IMAGE_TOKEN}\n" * len(images) + text
        self.turns.append(_Turn("user", text, images))
        try:
            while True:
                try:
                    return self.model.prepare(self.messages, self.images)
                except PromptError as err:
                    if len(self.turns) <= 1 or "context" not in str(err):
                        raise
                    dropped = 2 if len(self.turns) > 2 else 1
                    log.warning("the chat no longer fits the model's context; forgetting its oldest exchange")
                    del self.turns[:dropped]
        except BaseException:  # Ctrl-C too
            self.turns.pop()  # a turn that cannot be answered is not part of the history
            raise

    def _record(self, completion: Completion) -> None:
        self.turns.append(_Turn("assistant", completion.text, []))

    def send(self, text: str, images: Sequence[ImageSource] = (), **options: Any) -> Completion:
        """Ask, wait for the whole answer, and remember both turns."""
        prompt = self._prepare(text, images)
        completion = self.model.generate(prompt, **dataclasses.asdict(self.options.updated(**options)))
        self._record(completion)
        return completion

    def stream(self, text: str, images: Sequence[ImageSource] = (), **options: Any) -> TextStream:
        """Ask and get the answer as a TextStream; the answer is remembered when the stream ends (even if cut short)."""
        prompt = self._prepare(text, images)
        return self.model.stream(prompt, on_done=self._record, **dataclasses.asdict(self.options.updated(**options)))
