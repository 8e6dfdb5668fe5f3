"""`LiveServer`: uvicorn serving a `create_app` app in a daemon thread on 127.0.0.1, for tests that talk to a real
socket; it shuts down as `vlm.serve` does (`AppServer`)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from vlm.server.app import AppServer


class LiveServer:
    """uvicorn serving an app on a socket it already bound (no port race), in a daemon thread."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = AppServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
