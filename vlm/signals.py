"""Signals noted instead of acted on at once, for blocks that must run whole: a thread being started, a piece of an
answer being printed (Ctrl-C), the last checkpoint being written (a scheduler's SIGTERM)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Noted:
    previous: Callable[..., Any] | int | None = None  # the handler before the block, back in place after it
    signals: list[int] = field(default_factory=list)  # those that came inside the block

    @property
    def received(self) -> bool:
        return bool(self.signals)


@contextmanager
def signal_handled(signum: int, handler: Callable[[int, Any], Any]) -> Iterator[Callable[..., Any] | int | None]:
    """Inside the block `handler` handles `signum`; yields the handler before it, back in place after the block.
    Signal handlers belong to the main thread: elsewhere the signal is handled as it was, and None is yielded."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    previous = signal.signal(signum, handler)
    try:
        yield previous
    finally:
        signal.signal(signum, previous)


@contextmanager
def signal_noted(signum: int) -> Iterator[Noted]:
    """Inside the block, `signum` is only noted (in the main thread; elsewhere it is handled as it was)."""
    noted = Noted()
    with signal_handled(signum, lambda number, frame: noted.signals.append(number)) as noted.previous:
        yield noted


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C inside the block is raised as KeyboardInterrupt when the block ends, so the block runs whole."""
    with signal_noted(signal.SIGINT) as noted:
        yield
    if noted.received and callable(noted.previous):
        noted.previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill, `kill PID`) raised as Ctrl-C is, so the same cleanup runs and says what was kept;
    a command exits with 143 for it (128 + the signal) where Ctrl-C gives 130."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside the block, SIGTERM raises Terminated in the main thread (elsewhere it is handled as it was)."""
    with signal_handled(signal.SIGTERM, _raise_terminated):
        yield
