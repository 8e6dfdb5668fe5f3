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
def signal_noted(signum: int) -> Iterator[Noted]:
    """Inside the block, `signum` is only noted. Signal handlers belong to the main thread: elsewhere nothing is
    noted, and the signal is handled as it was."""
    noted = Noted()
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    noted.previous = signal.signal(signum, lambda number, frame: noted.signals.append(number))
    try:
        yield noted
    finally:
        signal.signal(signum, noted.previous)


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


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside the block, SIGTERM raises Terminated in the main thread (elsewhere it is handled as it was)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
