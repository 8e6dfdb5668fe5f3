"""The FastAPI app (`create_app`) and what runs behind it: `Server`, the worker threads (`max_concurrency`) around one
ChatModel behind admission control (`vlm.server.admission`), and the routes.

Generation never runs on the event loop. A client that goes away stops its generation through a StoppingCriteria
flag (`cancel`), freeing its slot. `GET /v1/models` and `GET /health` live here too, next to the chat routes; who may
call is `vlm.server.access`'s business, and the chat page's routes come from `vlm.server.web`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm.chat import ChatModel
from vlm.data.tiler import ImageLoadError
from vlm.generation.completion import Completion, PromptError
from vlm.generation.options import OptionError
from vlm.server.access import SameSiteOnly, check_key
from vlm.server.admission import SHUTTING_DOWN, Admission, Ticket
from vlm.server.anthropic import anthropic_events, anthropic_message, parse_anthropic
from vlm.server.errors import ANTHROPIC, OPENAI, OVERLOADED, ApiError, api_of, error_response
from vlm.server.openai import openai_completion, openai_events, parse_openai
from vlm.server.requests import ChatRequest, Parser, read_json, require_dict
from vlm.server.settings import ServeSettings
from vlm.server.sse import Events
from vlm.server.web import web_router

log = logging.getLogger("vlm.serve")  # the name users' log lines and filters already know


class Server:
    """The worker pool around one ChatModel, behind admission control (`slots`)."""

    def __init__(self, chat: ChatModel, settings: ServeSettings) -> None:
        # the server's defaults for what a request leaves out; a bad one fails here, not per request
        chat.options(temperature=settings.temperature, kv_cache=settings.kv_cache, h2o=settings.h2o)
        self.chat = chat
        self.settings = settings
        self.model_name = settings.model_name or chat.name
        self.pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="vlm-generate")
        self.slots = Admission(settings.max_concurrency + settings.max_queue)
        # token counts decode and tile a request's images too: as many at once as requests may be admitted
        self.counting = Admission(settings.max_concurrency + settings.max_queue)
        self.parser = Parser(settings, settings.max_tokens_limit or chat.context_length,
                             chat.processor.template.as_plain_text)

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, **self.slots.counts()}

    def options(self, request: ChatRequest) -> dict[str, Any]:
        options = {k: v for k, v in request.options.items() if v not in (None, [])}
        options.setdefault("temperature", self.settings.temperature)
        options.setdefault("kv_cache", self.settings.kv_cache)
        options["h2o"] = self.settings.h2o
        return options

    def _job(self, request: ChatRequest, ticket: Ticket,
             emit: Callable[[str, Any], None] | None) -> Completion | None:
        """Runs on a worker thread: encode (tiler + template), then generate; always frees the slot. None: the client
        left while the request waited (a stream hears "skipped")."""
        stop_reason = None
        try:
            if not self.slots.start(ticket):
                if emit is not None:
                    emit("skipped", None)
                return None
            prompt = self.chat.prepare(request.messages, request.images)
            if emit is None:
                completion = self.chat.generate(prompt, cancel=ticket.cancel, **self.options(request))
            else:
                stream = self.chat.stream(prompt, cancel=ticket.cancel, **self.options(request))  # settings refused now
                emit("start", prompt.input_tokens)  # ... so a refusal gets its 4xx before the stream starts
                with stream:
                    for piece in stream:
                        emit("text", piece)
                completion = stream.completion
            if completion.stop_reason == "cancelled" and self.slots.closing:  # a cut answer must not pass for whole
                raise ApiError(503, f"{SHUTTING_DOWN} (the answer was stopped after {completion.output_tokens} tokens)")
            if emit is not None:
                emit("done", completion)
            stop_reason = completion.stop_reason
            return completion
        except Exception as err:
            if emit is None:
                raise
            emit("error", err)
            return None
        finally:
            self.slots.finish(ticket, stop_reason)

    async def complete(self, http: Request, request: ChatRequest, api: str) -> Completion:
        ticket = self.slots.admit(api)
        future = asyncio.get_running_loop().run_in_executor(self.pool, self._job, request, ticket, None)
        watcher = asyncio.create_task(self._watch_disconnect(http, ticket))
        try:
            # shield: if this handler is cancelled the job still runs (and sees `cancel`) so its slot is freed
            completion = await asyncio.shield(future)
            if completion is None:  # skipped: the client left while it waited; nobody reads this answer
                raise ApiError(499, "the client closed the request")
            return completion
        except (PromptError, ImageLoadError, OptionError) as err:
            raise request.error(err) from None
        except asyncio.CancelledError:
            self.slots.abandon(ticket)
            raise
        finally:
            watcher.cancel()

    async def stream(self, http: Request, request: ChatRequest, api: str,
                     render: Callable[[int, Events], AsyncIterator[bytes]]) -> StreamingResponse:
        ticket = self.slots.admit(api)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (shutdown): stop generating
                ticket.cancel.set()

        loop.run_in_executor(self.pool, self._job, request, ticket, emit)  # the job reports through `emit`
        watcher = asyncio.create_task(self._watch_disconnect(http, ticket))  # until the first event
        try:
            kind, value = await queue.get()  # encoding errors still get a proper 4xx before any event is sent
        except asyncio.CancelledError:
            self.slots.abandon(ticket)
            raise
        finally:
            watcher.cancel()
        if kind == "skipped":
            raise ApiError(499, "the client closed the request")
        if kind == "error":
            ticket.cancel.set()
            if isinstance(value, PromptError | ImageLoadError | OptionError):
                raise request.error(value)
            raise value

        async def events() -> Events:
            while True:
                item = await queue.get()
                yield item
                if item[0] in ("done", "error"):
                    return

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in render(value, events()):
                    yield chunk
            finally:
                ticket.cancel.set()  # normal end: no-op; a client that disconnected: stop its generation now

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def _watch_disconnect(self, http: Request, ticket: Ticket) -> None:
        while not ticket.cancel.is_set():
            if await http.is_disconnected():
                self.slots.abandon(ticket)
                return
            await asyncio.sleep(0.2)


class AppServer(uvicorn.Server):
    """uvicorn for an app from `create_app`. When it shuts down (Ctrl-C, SIGTERM), before it waits out its grace
    period for open requests, the waiting ones are refused and the running ones stopped at their next token, each
    with a 503 in its API's shape (an error event for a stream): clients read why and retry elsewhere, rather than
    being cut off mid-answer when the grace period ends."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        running, queued = self.config.app.state.server.slots.close()
        if running or queued:
            log.info("stopping %d running answer(s) and refusing %d waiting request(s): the server is shutting down",
                     running, queued)
        await super().shutdown(sockets)


def create_app(chat_model: ChatModel, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving `chat_model`; run it with uvicorn (see `main`)."""
    settings = settings or ServeSettings()
    server = Server(chat_model, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="vlm", summary="A vision-language model behind the Anthropic and OpenAI chat APIs",
                  docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(SameSiteOnly, bound_to=settings.host, allowed_hosts=settings.allowed_hosts)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        if err.status in OVERLOADED:
            log.warning("%s %s: %s", request.method, request.url.path, err.message)
        elif err.status >= 500 and err.status != 503:  # 503: shutting down, said once by AppServer
            log.error("%s %s: %s", request.method, request.url.path, err.message)
        return error_response(api_of(request), err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(api_of(request), ApiError(err.status_code, str(err.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(api_of(request), ApiError(500, f"internal error: {type(err).__name__}"))

    if settings.web:
        app.include_router(web_router(server))

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' and uptime monitors' probes
    async def health() -> dict:
        return server.health()

    def model_entry() -> dict:
        """The one model, as both SDKs read it: OpenAI's Model and Anthropic's ModelInfo."""
        name, now = server.model_name, int(time.time())
        return {"id": name, "object": "model", "type": "model", "created": now, "owned_by": "vlm",
                "display_name": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request, settings.api_key)
        name = server.model_name
        return {"object": "list", "data": [model_entry()], "has_more": False, "first_id": name, "last_id": name}

    @app.get("/v1/models/{model_id:path}")  # path: an "org/name" id has a slash
    async def model(request: Request, model_id: str) -> dict:
        check_key(request, settings.api_key)
        if model_id != server.model_name:
            raise ApiError(404, f"model {model_id!r} not found; this server serves {server.model_name!r}",
                           code="model_not_found")
        return model_entry()

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> dict:
        check_key(request, settings.api_key)
        body = require_dict(await read_json(request, settings.max_body_bytes))
        chat, _ = await asyncio.to_thread(parse_anthropic, {**body, "max_tokens": 1}, server.parser)  # no answer
        ticket = server.counting.admit(ANTHROPIC)
        try:
            tokens = await asyncio.to_thread(server.chat.count_tokens, chat.messages, chat.images)
        except (PromptError, ImageLoadError) as err:
            raise chat.error(err) from None
        finally:
            server.counting.finish(ticket)
        return {"input_tokens": tokens}

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        check_key(request, settings.api_key)
        chat, _ = await asyncio.to_thread(parse_anthropic, await read_json(request, settings.max_body_bytes),
                                          server.parser)
        msg_id = f"msg_{uuid.uuid4().hex[:24]}"
        if chat.stream:
            return await server.stream(request, chat, ANTHROPIC, lambda tokens, events: anthropic_events(
                msg_id, server.model_name, tokens, events))
        completion = await server.complete(request, chat, ANTHROPIC)
        return JSONResponse(anthropic_message(msg_id, server.model_name, completion))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request, settings.api_key)
        chat, _ = await asyncio.to_thread(parse_openai, await read_json(request, settings.max_body_bytes),
                                          server.parser)
        cmpl_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            return await server.stream(request, chat, OPENAI, lambda tokens, events: openai_events(
                cmpl_id, server.model_name, created, chat.include_usage, events))
        completion = await server.complete(request, chat, OPENAI)
        return JSONResponse(openai_completion(cmpl_id, server.model_name, created, completion))

    return app
