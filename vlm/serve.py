"""`python -m vlm.serve checkpoint=PATH [host=127.0.0.1] [port=8000]`: an HTTP server for an exported model.

It speaks two wire formats over the same `vlm.chat.ChatModel`, so the official SDKs and the tools built on them work:
- `POST /v1/messages`: the Anthropic Messages API (text + base64 image blocks, system, stop_sequences, streaming
  with the SSE event sequence the `anthropic` SDK expects);
- `POST /v1/chat/completions`: the OpenAI chat API (`image_url` parts with `data:` URLs, streaming chunks ending with
  `data: [DONE]`, usage, `stream_options.include_usage`);
- `GET /v1/models`, `GET /health`;
- `GET /`: a chat page for the browser (off with `web=false`).

This module is only the entry point: settings from configs/serve.yaml → logging → load the model → run uvicorn. The
server itself lives in `vlm.server` (validation, admission control, cancellation, the security defaults);
`create_app(chat_model, settings)` builds the FastAPI app, so tests and other programs can serve a model they already
hold. Both are re-exported here.
"""

from __future__ import annotations

import logging
import socket
import sys

import hydra
import uvicorn
from omegaconf import DictConfig

from vlm.cli import CONFIG_DIR, fail, load_chat_model, preflight, require_chat_export, setup_logging, user_errors
from vlm.server import ServeSettings, create_app
from vlm.server.access import is_loopback
from vlm.server.app import AppServer
from vlm.server.web import page_url

__all__ = ["ServeSettings", "create_app", "main", "serve"]

log = logging.getLogger("vlm.serve")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="serve")
def serve(cfg: DictConfig) -> None:
    with user_errors():
        settings = ServeSettings.from_dict(cfg)
    setup_logging(settings.log_level)
    require_chat_export(settings.checkpoint)
    chat = load_chat_model(settings.checkpoint, settings.device, settings.dtype, settings.model_name)
    with user_errors():  # the server's defaults are checked as it is made, before the port is taken
        app = create_app(chat, settings)
    listener = listening_socket(settings.host, settings.port)
    port = listener.getsockname()[1]  # port=0: the free port the system picked
    if not is_loopback(settings.host) and not settings.api_key:
        log.warning("listening on %s without api_key: anyone who can reach port %d can use the model",
                    settings.host, port)
    log.info("serving %s on http://%s:%d (POST /v1/messages, POST /v1/chat/completions)", chat.name, settings.host,
             port)
    if settings.web:
        log.info("chat page: %s", page_url(settings.host, port))
    server = AppServer(uvicorn.Config(app, log_level=settings.log_level.lower(), timeout_graceful_shutdown=5))
    server.run(sockets=[listener])


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the log says it serves: a taken port or an unknown host is one clear error
    instead of a "serving on" line followed by uvicorn's failure."""
    if not host.strip():
        fail("host= is empty; give an address of this machine (127.0.0.1 for this machine only, 0.0.0.0 for all)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as err:
        reason = (err.strerror or str(err)).split(" (while attempting")[0]  # Python appends the address again
        fail(f"cannot listen on {host}:{port} ({reason}); set host= to an address of this machine and port= to a "
             f"free port")


def main() -> None:
    preflight(sys.argv[1:], "serve")
    serve()


if __name__ == "__main__":
    main()
