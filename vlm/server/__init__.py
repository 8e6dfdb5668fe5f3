"""The HTTP server behind `python -m vlm.serve`: the Anthropic Messages API and the OpenAI chat completions API over
one `vlm.chat.ChatModel`.

It owns request validation (each API's own error JSON, always 4xx for bad input), admission control (a bounded queue
in front of `max_concurrency` worker threads), cancellation (a client that goes away frees its slot) and the security
defaults (loopback bind, optional API key, body and image size limits). One module per concern:
- `settings`: `ServeSettings`, every knob and its validation;
- `errors`: `ApiError` and each API's error JSON;
- `requests`: the shared request model, body reading, image decoding and the checks both APIs share;
- `sse`: the server-sent-events framing both streams use;
- `anthropic`, `openai`: each wire format's parsing, responses and streaming events;
- `app`: the worker pool and queue (`Server`), the API key check and the FastAPI app (`create_app`);
- `web`: the browser chat page at `/` (static files in `web/`) and the limits it reads from `/web/config`.
"""

from vlm.server.app import create_app
from vlm.server.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
