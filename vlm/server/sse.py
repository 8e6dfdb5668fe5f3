"""Server-sent events: the wire framing and the event-stream type that both APIs' streaming responses share."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

# what a worker reports to a stream renderer: ("text", piece) ..., then ("done", Completion) or ("error", exception)
Events = AsyncIterator[tuple[str, Any]]


def sse(event: str | None, data: dict | str) -> bytes:
    """One SSE message: an optional `event:` line, then `data:` with `data` as JSON (a str goes as is)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "").encode() + f"data: {payload}\n\n".encode()
