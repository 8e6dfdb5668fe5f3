"""Admission control: at most `capacity` requests running or queued, each holding a `Ticket` until it is done.

A full server refuses at once (529 for Anthropic clients, 429 for OpenAI ones). A client that leaves while its request
waits frees its slot at once; one that leaves while its answer is written stops it at the next token, and the slot is
freed when the worker lets go of it. A server shutting down (`close`) refuses what arrives or still waits, and stops
what runs (503, `SHUTTING_DOWN`).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from vlm.server.errors import ANTHROPIC, ApiError

SHUTTING_DOWN = "the server is shutting down; retry on a server that is up"


@dataclass(eq=False)  # held in a set by identity
class Ticket:
    """One admitted request: its cancel flag, and whether a worker has started it."""

    cancel: threading.Event = field(default_factory=threading.Event)
    started: bool = False


class Admission:
    """The slots of running and queued requests; every method is safe from the event loop and worker threads."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.admitted: set[Ticket] = set()  # running + waiting: their slots are taken
        self.running = 0
        self.finished: Counter = Counter()  # stop reasons of finished generations, for /health
        self.closing = False
        self.lock = threading.Lock()

    def admit(self, api: str) -> Ticket:
        with self.lock:
            if self.closing:
                raise ApiError(503, SHUTTING_DOWN)
            if len(self.admitted) >= self.capacity:
                status = 529 if api == ANTHROPIC else 429
                raise ApiError(status, f"the server is busy ({self.capacity} requests running or queued); retry soon")
            ticket = Ticket()
            self.admitted.add(ticket)
        return ticket

    def start(self, ticket: Ticket) -> bool:
        """On a worker: False if the client left while the request waited (its slot is already free); an ApiError
        (503) if the server began shutting down meanwhile."""
        with self.lock:
            if self.closing:
                raise ApiError(503, SHUTTING_DOWN)
            if ticket.cancel.is_set():
                return False
            ticket.started = True
            self.running += 1
            return True

    def abandon(self, ticket: Ticket) -> None:
        """The client left: stop its generation at the next token, or free its slot now if it is still queued."""
        ticket.cancel.set()
        with self.lock:
            if not ticket.started:
                self.admitted.discard(ticket)  # frees its slot; the worker's `finish` later frees nothing more

    def close(self) -> tuple[int, int]:
        """The server is shutting down: no request is admitted or started from now on, and every running generation
        stops at its next token (its worker then answers 503). Returns how many were running and queued."""
        with self.lock:
            self.closing = True
            tickets = list(self.admitted)
            running = self.running
        for ticket in tickets:
            ticket.cancel.set()
        return running, len(tickets) - running

    def finish(self, ticket: Ticket, stop_reason: str | None = None) -> None:
        """The worker is done with `ticket` (`stop_reason`: how its answer ended, if it was generated)."""
        with self.lock:
            if ticket.started:
                self.running -= 1
            if stop_reason is not None:
                self.finished[stop_reason] += 1
            self.admitted.discard(ticket)

    def counts(self) -> dict:
        with self.lock:
            return {"running": self.running, "queued": len(self.admitted) - self.running, "capacity": self.capacity,
                    "finished": dict(self.finished)}
