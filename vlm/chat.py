"""The chat API: load an export once, then answer conversations with images, whole or as a stream of text pieces.

`vlm.infer` (terminal) and `vlm.serve` (HTTP) are thin layers over this module. It owns two classes:
- `ChatModel`: an align/sft export on a device, with `prepare` (the shared processor: tiler + chat template),
  `generate` and `stream`. Decoding is transformers' `generate` with its KV cache (see `vlm.generation`):
  every past key (`kv_cache="dynamic"`), an H2O budget of heavy hitters and recent tokens (`kv_cache="h2o"`),
  or, for a model trained with local + global attention, only the keys its pattern reads.
- `ChatSession`: history and images over several turns.

A conversation is `[{"role": "system"|"user"|"assistant", "content": str}]`; the text holds one `<image>`
placeholder per image, and `images` lists the image sources (paths, bytes or PIL images) in placeholder order.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteriaList, TextIteratorStreamer

from vlm.data.processor import PROMPT_NAME, ImageSource, Processor, PromptTooLong, SampleError, pad_batch
from vlm.data.tokenizer import IMAGE_TOKEN
from vlm.exports.format import read_meta
from vlm.exports.vlm import load_vlm
from vlm.generation.completion import (
    Completion,
    ContextOverflow,
    Message,
    Prompt,
    PromptError,
    check_conversation,
    check_system_prompt,
)
from vlm.generation.device import pick_device, pick_dtype
from vlm.generation.h2o import H2OBudget, H2OCache, refuse_unsupported
from vlm.generation.kv_cache import cache_kwargs
from vlm.generation.options import GenerationOptions, OptionError, auto_temperature, resolve_decoding
from vlm.generation.stopping import (
    Cancelled,
    StopInAnswer,
    answer_texts,
    cut_answer,
    stop_reason,
    through_first_end,
    turn_end_ids,
)
from vlm.generation.streaming import AnswerJob, TextStream
from vlm.models.llm import trained_positions

__all__ = ["ChatModel", "ChatSession", "Completion", "ContextOverflow", "GenerationOptions", "OptionError", "Prompt",
           "PromptError", "TextStream"]

log = logging.getLogger(__name__)


def image_list(images: Sequence[ImageSource] | None) -> list[ImageSource]:
    """`images` as a list (None: none). One path, bytes or PIL image is refused: a path would otherwise be read as
    its characters, one image per letter."""
    if isinstance(images, str | bytes | os.PathLike | Image.Image):
        raise PromptError(f"images must be a list (one entry per {IMAGE_TOKEN}), got one "
                          f"{type(images).__name__}: pass [{images!r:.80}]")
    return list(images or [])


def export_name(path: str | Path) -> str:
    """The name a model goes by (in the REPL's banner, the server's model id): the folder's, or for the `export`
    folder of a training run (checkpoints/sft/RUN/export) its stage and run, "sft-RUN"."""
    folder = Path(path).expanduser().resolve()
    return f"{read_meta(folder).stage}-{folder.parent.name}" if folder.name == "export" else folder.name


class ChatModel:
    """An align/sft export ready to chat. Load once with `ChatModel.load(path)`; safe to share between threads.

    Concurrent calls each run their own `generate`. `seed` seeds torch's global RNG, so a seeded answer is
    reproducible when no other sampling runs in the same process at the same time.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, processor: Processor, device: torch.device,
                 name: str = "vlm", defaults: GenerationOptions | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self.defaults = defaults or GenerationOptions()
        self.context_length: int = trained_positions(model.lm) or processor.max_length  # none named: training's
        # The training max_length caps training samples; a prompt may use the model's whole context. Truncating a
        # prompt would cut its generation prompt, so `prepare` refuses prompts that do not fit instead.
        self.processor = Processor(tokenizer, processor.tiler, self.context_length)
        # No token spans more characters than the longest vocabulary entry, so longer text cannot fit; `prepare`
        # refuses it before tokenizing (megabytes of text would hold a worker for seconds).
        self.max_text_chars = self.context_length * max(map(len, tokenizer.get_vocab()))
        self.eos_token_ids: set[int] = set(turn_end_ids(tokenizer, model.lm.generation_config))

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
             name: str | None = None) -> ChatModel:
        """Load an export folder written by `vlm.train` (stage align or sft) onto `device` (default: cuda if any)."""
        bundle = load_vlm(path)
        target = pick_device(device)
        model = bundle.model.to(device=target, dtype=pick_dtype(dtype, target))
        log.info("loaded %s on %s (%s)", path, target, next(model.parameters()).dtype)
        return cls(model, bundle.tokenizer, bundle.processor, target, name or export_name(path))

    def options(self, **overrides: Any) -> GenerationOptions:
        """The model's decoding defaults with `overrides`. H2O asked of a model it cannot run on is refused here
        (OptionError naming kv_cache), so a session or a server refuses it as it starts, before any text streams."""
        options = self.defaults.updated(**overrides)
        if options.kv_cache == "h2o":
            refuse_unsupported(self.model.lm)  # the verdict is kept on the model: one probe per model
        return options

    def prepare(self, messages: Sequence[Message], images: Sequence[ImageSource] = ()) -> Prompt:
        """Encode a conversation for generation. Raises PromptError (ContextOverflow when it is too long), or
        ImageLoadError for an unreadable image."""
        messages = [dict(m) for m in messages]
        check_conversation(messages)
        if (text_chars := sum(len(m["content"]) for m in messages)) > self.max_text_chars:
            raise ContextOverflow(f"the conversation's text is {text_chars:,} characters, more than the model's "
                                  f"context of {self.context_length} tokens can hold; shorten it or start a new chat")
        try:
            encoded = self.processor.prompt(messages, image_list(images))
        except PromptTooLong as err:
            raise ContextOverflow(str(err).removeprefix("request: "), err.tokens) from None
        except SampleError as err:
            raise PromptError(str(err).removeprefix("request: ")) from None
        if len(encoded.input_ids) >= self.context_length:
            raise ContextOverflow(f"the conversation is at least {len(encoded.input_ids)} tokens (images included) "
                                  f"and the model's context is {self.context_length}; shorten it or start a new chat",
                                  len(encoded.input_ids))
        return Prompt(messages, encoded)

    def count_tokens(self, messages: Sequence[Message], images: Sequence[ImageSource] = ()) -> int:
        """The conversation's prompt length in tokens, images included, as `prepare` encodes it; over the context
        too, since a client counts to know how much to trim. Raises as `prepare` does otherwise, and ContextOverflow
        for text with more characters than the context could hold, which is refused before it is tokenized."""
        try:
            return self.prepare(messages, images).input_tokens
        except ContextOverflow as err:
            if err.tokens is None:
                raise
            return err.tokens

    def generate(self, messages: Sequence[Message] | Prompt, images: Sequence[ImageSource] = (), *,
                 cancel: threading.Event | None = None, **options: Any) -> Completion:
        """Answer a conversation (or a `Prompt` from `prepare`). `options` are GenerationOptions fields."""
        return self.stream(messages, images, cancel=cancel, whole=True, **options).result()

    def stream(self, messages: Sequence[Message] | Prompt, images: Sequence[ImageSource] = (), *,
               cancel: threading.Event | None = None, on_done: Callable[[Completion], None] | None = None,
               whole: bool = False, **options: Any) -> TextStream:
        """Like `generate`, but returns a TextStream of text pieces as the tokens are generated. Beam search cannot
        stream (the best beam is only known at the end): it yields one piece. `on_done(completion)` runs when the
        stream ends, however it ends. `whole=True` generates without a streamer thread."""
        opts = self.options(**options)
        prompt = messages if isinstance(messages, Prompt) else self.prepare(messages, images)
        return TextStream(self._job(prompt, opts, cancel or threading.Event(), on_done, whole), self.tokenizer)

    def generate_batch(self, prompts: Sequence[Prompt], **options: Any) -> list[str]:
        """Answer many prompts (from `prepare`) in one left-padded batch through HF generate; each answer ends at its
        first end-of-turn token, or before its first `stop` sequence. For pipelines that sample many answers
        (`vlm.constitution`); a chat uses `generate`. With `seed`, the whole batch is reproducible. The dynamic cache
        only: H2O evicts per prompt, and left padding would shift what it keeps."""
        if not prompts:
            return []
        opts = self.options(**options)
        if opts.kv_cache != "dynamic":
            raise OptionError(f"kv_cache={opts.kv_cache!r}: generate_batch decodes with the dynamic cache; answer "
                              f"with generate, one prompt at a time, to use it", key="kv_cache")
        if opts.temperature == "auto" and opts.num_beams == 1:  # picked per conversation: a batch per temperature
            picked = [auto_temperature(p.messages)[0] for p in prompts]
            if len(set(picked)) > 1:
                answers: dict[int, str] = {}
                for temperature in sorted(set(picked)):
                    rows = [i for i, t in enumerate(picked) if t == temperature]
                    batch = self.generate_batch([prompts[i] for i in rows], **(options | {"temperature": temperature}))
                    answers.update(zip(rows, batch, strict=True))
                return [answers[i] for i in range(len(prompts))]
        room = self.context_length - max(p.input_tokens for p in prompts)
        decoding = resolve_decoding(opts, prompts[0].messages, room)  # every prompt's: one temperature, one room
        if opts.seed is not None:
            torch.manual_seed(opts.seed)
        inputs = self._inputs(prompts)
        new = self.model.generate(**inputs, **decoding.generate_kwargs, pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=sorted(self.eos_token_ids), **cache_kwargs(self.model.lm))  # (B, T_new)
        texts = answer_texts(new, self.tokenizer, sorted(self.eos_token_ids))
        return [cut_answer(text, opts.stop)[0].rstrip() for text in texts]

    def _job(self, prompt: Prompt, opts: GenerationOptions, cancel: threading.Event,
             on_done: Callable[[Completion], None] | None, whole: bool) -> AnswerJob:
        """Resolve the decoding now (the temperature="auto" choice is logged before any text appears)."""
        decoding = resolve_decoding(opts, prompt.messages, self.context_length - prompt.input_tokens)
        inputs = self._inputs([prompt])
        stopping = StoppingCriteriaList([Cancelled(cancel)])
        if opts.stop:
            stopping.append(StopInAnswer(self.tokenizer, opts.stop, inputs["input_ids"].shape[1]))
        kwargs = {**inputs, **decoding.generate_kwargs, "stopping_criteria": stopping,
                  "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": sorted(self.eos_token_ids)}
        budget = H2OBudget.for_prompt(opts.h2o, prompt.input_tokens) if opts.kv_cache == "h2o" else None

        def run(streamer: TextIteratorStreamer | None) -> list[int]:
            if opts.seed is not None:
                torch.manual_seed(opts.seed)  # seeds the CPU and every CUDA device
            # a fresh cache per answer: H2O's budget, or local + global attention's pattern cache, or the default
            cache = {"cache": H2OCache(self.model.lm, budget, cancel)} if budget else cache_kwargs(self.model.lm)
            ids = self.model.generate(**kwargs, **cache, streamer=streamer)[0].tolist()  # only the new tokens
            return through_first_end(ids, self.eos_token_ids)

        def finish(ids: list[int], text: str, stop: str | None) -> Completion:
            reason = stop_reason(ids, self.eos_token_ids, stop, cancel.is_set(), decoding.max_new_tokens,
                                 context_bound=decoding.max_new_tokens < opts.max_new_tokens)
            return Completion(text, reason, prompt.input_tokens, len(ids), stop, ids, decoding.temperature)

        return AnswerJob(run, finish, opts.stop, cancel, streamable=opts.num_beams == 1 and not whole,
                         on_done=on_done)

    def _inputs(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        batch = pad_batch([p.encoded for p in prompts], self.tokenizer.pad_token_id, left=True)
        vision_dtype = next(self.model.vision.parameters()).dtype
        return {"input_ids": batch["input_ids"].to(self.device),
                "attention_mask": batch["attention_mask"].to(self.device),
                "pixel_values": batch["pixel_values"].to(self.device, vision_dtype),
                "image_slots": batch["image_slots"].to(self.device)}

    def session(self, system: str | None = None, **options: Any) -> ChatSession:
        return ChatSession(self, system=system, **options)


def with_placeholders(text: str, images: int) -> str:
    """A user message for `images` attached images: one <image> each put in front when it has none; a message that
    places a different number is refused (its own counts, not a chat's totals)."""
    if images and IMAGE_TOKEN not in text:
        return f"{IMAGE_TOKEN}\n" * images + text
    if (placeholders := text.count(IMAGE_TOKEN)) != images:
        raise PromptError(f"the message has {placeholders} {IMAGE_TOKEN} placeholder{'s' * (placeholders != 1)} but "
                          f"{images} image{'s' * (images != 1)} attached; each image needs one")
    return text


@dataclass
class _Turn:
    role: str
    content: str
    images: list[ImageSource]


class ChatSession:
    """A conversation that remembers its turns and their images.

    `send(text, images=[...])` answers and records both turns; `stream(...)` does the same piece by piece, recording
    them when the stream ends (a stream cut short or closed keeps its partial answer, maybe empty; a new message first
    closes a stream still open). A message whose answer raised (`send` interrupted, a failed generation) leaves the
    history as it was. When
    `text` has no `<image>` placeholder, one per image is put at the start of the message. When the history no
    longer fits the context with room for the answer, the oldest exchanges are dropped (logged).
    """

    def __init__(self, model: ChatModel, system: str | None = None, **options: Any):
        check_system_prompt(system)
        if system is not None and (problem := model.processor.template.control_problem(system, "the system prompt")):
            raise PromptError(problem)
        self.model = model
        self.system = system
        self.options = model.options(**options)
        self.turns: list[_Turn] = []
        self._open_stream: TextStream | None = None

    @property
    def messages(self) -> list[Message]:
        return self._messages(self.turns)

    @property
    def images(self) -> list[ImageSource]:
        return [image for t in self.turns for image in t.images]

    def reset(self) -> None:
        """Forget every turn (the system prompt and options stay); a stream still open is closed first."""
        self._close_open_stream()
        self.turns.clear()

    def _close_open_stream(self) -> None:
        """Stop a stream the caller left open: its partial answer is recorded before anything else is."""
        if self._open_stream is not None:
            self._open_stream.close()
            self._open_stream = None

    def _messages(self, turns: list[_Turn]) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": t.role, "content": t.content} for t in turns]

    def _prepare(self, text: str, images: Sequence[ImageSource],
                 options: GenerationOptions) -> tuple[Prompt, list[_Turn]]:
        """Encode the chat with the new user turn, leaving out the oldest exchanges while it does not fit with room
        for the answer (`max_new_tokens`, or a quarter of the context if that is less). Returns the prompt and the
        turns it holds, which become the history once the answer comes (`_record`)."""
        self._close_open_stream()
        if problem := self.model.processor.template.control_problem(text, "the message"):
            raise PromptError(problem)  # named as the message typed, not by its place in the whole chat
        images = image_list(images)
        # tiled once, here: each later turn reads the tiles (as the image was when sent: a file changed or deleted
        # since, or a picture drawn on, does not change the chat), not the file again
        tiled = self.model.processor.tile_all(images, PROMPT_NAME, first_index=len(self.images))
        turn = _Turn("user", with_placeholders(text, len(images)), tiled)
        turns = [*self.turns, turn]
        wanted_room = min(options.max_new_tokens, self.model.context_length // 4)
        forgotten = 0  # exchanges left out
        while True:
            try:
                prompt = self.model.prepare(self._messages(turns), [i for t in turns for i in t.images])
                if len(turns) <= 1 or self.model.context_length - prompt.input_tokens >= wanted_room:
                    break
            except ContextOverflow:
                if len(turns) <= 1:
                    raise
            del turns[0]  # the oldest exchange: its question and the answers after it
            while turns[0].role != "user":
                del turns[0]
            forgotten += 1
        if forgotten:
            log.warning("the chat no longer fits the model's context with room for an answer, so %s forgotten",
                        "its oldest exchange is" if forgotten == 1 else f"its {forgotten} oldest exchanges are")
        return prompt, turns

    def _record(self, turns: list[_Turn], completion: Completion) -> None:
        """The question's turns and its answer become the history. An answer that spells <image> or a template marker
        (about SVG, or ChatML) is read back as those characters."""
        self.turns = [*turns, _Turn("assistant", self.model.processor.template.as_plain_text(completion.text), [])]

    def send(self, text: str, images: Sequence[ImageSource] = (), **options: Any) -> Completion:
        """Ask, wait for the whole answer, and remember both turns."""
        options = self.options.updated(**options)
        prompt, turns = self._prepare(text, images, options)
        completion = self.model.generate(prompt, **options.as_dict())
        self._record(turns, completion)
        return completion

    def stream(self, text: str, images: Sequence[ImageSource] = (), **options: Any) -> TextStream:
        """Ask and get the answer as a TextStream; the answer is remembered when the stream ends (even if cut short)."""
        options = self.options.updated(**options)
        prompt, turns = self._prepare(text, images, options)
        self._open_stream = self.model.stream(prompt, on_done=functools.partial(self._record, turns),
                                              **options.as_dict())
        return self._open_stream
