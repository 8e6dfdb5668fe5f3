"""Streaming one answer: `generate` runs on a worker thread and hands text to a `TextIteratorStreamer`; the reader
gets the pieces through stop-sequence scanning, and can cancel at any point."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from transformers import TextIteratorStreamer

from vlm.generation.completion import Completion
from vlm.generation.stopping import StopScanner, cut_answer
from vlm.signals import interrupts_deferred


@dataclass
class AnswerJob:
    """One answer to generate: how to run it and how to report it."""

    run: Callable[[TextIteratorStreamer | None], list[int]]  # runs `generate` (feeding the streamer); new token ids
    finish: Callable[[list[int], str, str | None], Completion]  # (new ids, answer text, stop sequence met)
    stops: tuple[str, ...]  # stop sequences, cut from the text as it streams
    cancel: threading.Event
    streamable: bool = True  # False for beam search: the best beam is only known at the end
    # runs when the answer ends: finished, stopped or cancelled (a partial answer, maybe empty); not when generation
    # raised
    on_done: Callable[[Completion], None] | None = None


class TextStream(Iterator[str]):
    """Text pieces of one answer as they are generated.

    Iterate it; once it is exhausted `completion` holds the whole answer, its stop reason and token counts. The
    pieces join to `completion.text`: a piece that might begin a stop sequence is held back until it is clear.
    `cancel()` (or `close()`, or leaving a `with` block) stops the generation at the next token.
    """

    def __init__(self, job: AnswerJob, tokenizer: Any):
        self.completion: Completion | None = None
        self._job = job
        self._tokenizer = tokenizer
        self._pieces = self._streamed() if job.streamable else self._whole()

    def __next__(self) -> str:
        return next(self._pieces)

    def cancel(self) -> None:
        self._job.cancel.set()

    def close(self) -> None:
        """Stop the generation and wait for its thread; `completion` then holds what was generated."""
        self._job.cancel.set()
        self._pieces.close()  # type: ignore[attr-defined]
        if self.completion is None:  # closed before its first piece was asked for: nothing ran, nothing was said
            self._done(self._job.finish([], "", None))

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def result(self) -> Completion:
        """Drain the stream and return its Completion."""
        for _ in self:
            pass
        assert self.completion is not None  # set when the pieces end, however they end
        return self.completion

    @property
    def text(self) -> str:
        """Drain the stream and return the whole answer."""
        return self.result().text

    def _done(self, completion: Completion, answered: bool = True) -> None:
        self.completion = completion
        if self._job.on_done and answered:
            self._job.on_done(completion)

    def _whole(self) -> Iterator[str]:
        ids: list[int] = []
        try:
            ids = self._job.run(None)
            text, stop = cut_answer(self._tokenizer.decode(ids, skip_special_tokens=True), self._job.stops)
            completion = self.completion = self._job.finish(ids, text, stop)
            if completion.text:
                yield completion.text
        finally:  # generate raised (or Ctrl-C stopped it): no answer
            self._done(self.completion or self._job.finish(ids, "", None), answered=self.completion is not None)

    def _streamed(self) -> Iterator[str]:
        job = self._job
        # skip_prompt drops the prompt ids that generate hands the streamer first
        streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["ids"] = job.run(streamer)
            except BaseException as err:  # hand it to the reader, and never leave it blocked on the queue
                result["error"] = err
                streamer.end()

        # Not a daemon: a daemon thread still inside torch when the interpreter exits is killed mid-C++ and aborts the
        # process ("terminate called without an active exception"); the cancel flag ends this one within a step.
        thread = threading.Thread(target=work, name="vlm-generate")
        scanner = StopScanner(job.stops)
        emitted: list[str] = []
        finished = launched = False
        try:
            with interrupts_deferred():  # a Ctrl-C inside start() could leave the thread never started, or unjoinable
                thread.start()
                launched = True
            for piece in streamer:
                if job.cancel.is_set():
                    continue  # drain: generate ends within a step
                if ready := scanner.feed(piece):
                    emitted.append(ready)
                    yield ready
            finished = True
            thread.join()
            if "error" in result:
                raise result["error"]
            if (rest := scanner.flush()) and not job.cancel.is_set():
                emitted.append(rest)
                yield rest
        finally:
            if not finished:
                job.cancel.set()  # the reader left early (Ctrl-C, a closed stream): stop generating
            if launched:
                thread.join()
            self._done(job.finish(result.get("ids", []), "".join(emitted), scanner.stop),
                       answered="error" not in result)
