"""`python -m vlm.serve checkpoint=PATH [host=127.0.0.1] [port=8000]`: an HTTP server for an exported model.

It speaks two wire formats over the same `vlm.chat.ChatModel`, so the official SDKs and the tools built on them work:
- `POST /v1/messages`: the Anthropic Messages API (text + base64 image blocks, system, stop_sequences, streaming
  with the SSE event sequence the `anthropic` SDK expects);
- `POST /v1/chat/completions`: the OpenAI chat API (`image_url` parts with `data:` URLs, streaming chunks ending with
  `data: [DONE]`, usage, `stream_options.include_usage`);
- `GET /v1/models`, `GET /health`.

This module owns request validation (each API's own error JSON, always 4xx for bad input), admission control (a
bounded queue in front of `max_concurrency` worker threads: generation never runs on the event loop, and a full
queue answers 529 / 429 at once), cancellation (a client that goes away stops its generation through a
StoppingCriteria flag, freeing its slot), and the security defaults (loopback bind, optional API key, body and image
size limits; images go through the processor's tiler and its bomb guard). `create_app(chat_model, settings)` builds
the FastAPI app, so tests and other programs can serve a model they already hold.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import hydra
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from omegaconf import DictConfig, OmegaConf
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm.chat import ChatModel, Completion, OptionError, PromptError
from vlm.cli import CONFIG_DIR, fail, preflight, user_errors
from vlm.data.tiler import ImageLoadError
from vlm.data.tokenizer import IMAGE_TOKEN

log = logging.getLogger("vlm.serve")

ANTHROPIC, OPENAI = "anthropic", "openai"
MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


@dataclass
class ServeSettings:
    """Server settings (configs/serve.yaml documents each one)."""

    checkpoint: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_concurrency: int = 1
    max_queue: int = 8
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_bytes: int = 5 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_images: int = 8
    max_tokens_limit: int | None = None
    default_max_tokens: int = 512
    temperature: float | str = "auto"
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        for key in ("max_concurrency", "max_body_bytes", "max_image_bytes", "max_image_pixels", "default_max_tokens"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)!r} must be an integer >= 1")
        for key in ("max_queue", "max_images"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be an integer >= 0")
        if self.max_tokens_limit is not None and (not isinstance(self.max_tokens_limit, int)
                                                  or self.max_tokens_limit < 1):
            raise ValueError(f"max_tokens_limit={self.max_tokens_limit!r} must be an integer >= 1 or null")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r} must be an integer 0-65535")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServeSettings:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown server setting {unknown[0]!r}; valid settings: {sorted(names)}")
        return cls(**values)


# ---- errors ----


class ApiError(Exception):
    """A request the server refuses; rendered in the calling API's own error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                    405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error",
                    529: "overloaded_error"}
_OPENAI_TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}
_OPENAI_CODES = {401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded"}


def error_body(api: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    if api == ANTHROPIC:
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    kind = _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or _OPENAI_CODES.get(status)}}


def error_response(api: str, err: ApiError) -> JSONResponse:
    headers = {"retry-after": "1"} if err.status in (429, 529) else None
    return JSONResponse(error_body(api, err.status, err.message, err.param, err.code), err.status, headers=headers)


def api_of(request: Request) -> str:
    return ANTHROPIC if request.url.path.startswith("/v1/messages") else OPENAI


# ---- request parsing ----


@dataclass
class ChatRequest:
    """A request in this server's terms: a conversation with `<image>` placeholders, its images and options."""

    messages: list[dict[str, str]]
    images: list[bytes]
    options: dict[str, Any]
    stream: bool = False
    include_usage: bool = False


def _sniff(data: bytes) -> str | None:
    """The media type the bytes' signature says, for the formats both APIs accept."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


class Parser:
    """Shared checks for both APIs; every failure is an ApiError(400) naming the field."""

    def __init__(self, settings: ServeSettings, tokens_limit: int):
        self.settings = settings
        self.tokens_limit = tokens_limit

    def image(self, data: Any, media_type: Any, where: str) -> bytes:
        if media_type not in MEDIA_TYPES:
            raise ApiError(400, f"{where}: unsupported image media type {media_type!r}; use one of {list(MEDIA_TYPES)}",
                           param=where)
        if not isinstance(data, str) or not data:
            raise ApiError(400, f"{where}: image data must be a non-empty base64 string", param=where)
        limit = self.settings.max_image_bytes
        if len(data) > (limit + 2) // 3 * 4 + len(data) // 76 * 2 + 4:  # refuse before decoding (76: MIME wrapping)
            raise ApiError(400, f"{where}: the image is over the {limit:,}-byte limit", param=where)
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: image data is not valid base64", param=where) from None
        if len(raw) > limit:
            raise ApiError(400, f"{where}: the image is {len(raw):,} bytes, over the {limit:,}-byte limit", param=where)
        actual = _sniff(raw)
        if actual is None:
            raise ApiError(400, f"{where}: the data is not a JPEG, PNG, GIF or WebP image", param=where)
        if actual != media_type:
            raise ApiError(400, f"{where}: the image is {actual} but media_type says {media_type}", param=where)
        return raw

    @staticmethod
    def text(value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise ApiError(400, f"{where}: text must be a string", param=where)
        if IMAGE_TOKEN in value:
            raise ApiError(400, f"{where}: text may not contain {IMAGE_TOKEN!r}; send images as image blocks",
                           param=where)
        return value

    def max_tokens(self, value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ApiError(400, f"{where}: must be an integer >= 1, got {value!r}", param=where)
        if value > self.tokens_limit:
            raise ApiError(400, f"{where}: {value} is over this model's limit of {self.tokens_limit}", param=where)
        return value

    @staticmethod
    def number(body: dict, key: str, low: float, high: float, integer: bool = False, low_open: bool = False) -> Any:
        value = body.get(key)
        if value is None:
            return None
        kind = int if integer else (int, float)
        ok = isinstance(value, kind) and not isinstance(value, bool) and (value > low if low_open else value >= low)
        if not ok or value > high:
            span = f"{'(' if low_open else '['}{low}, {high}]"
            raise ApiError(400, f"{key}: must be {'an integer' if integer else 'a number'} in {span}, got {value!r}",
                           param=key)
        return value

    @staticmethod
    def stops(value: Any, where: str) -> list[str]:
        if value is None:
            return []
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(s, str) and s for s in values) or len(values) > 16:
            raise ApiError(400, f"{where}: must be a list of at most 16 non-empty strings", param=where)
        return values

    def conversation(self, turns: list[tuple[str, str]], system: str | None, images: list[bytes]) -> list[dict]:
        """Merge consecutive same-role turns (as the Anthropic API does), then check the order."""
        if len(images) > self.settings.max_images:
            raise ApiError(400, f"messages: {len(images)} images, over the limit of {self.settings.max_images}",
                           param="messages")
        merged: list[dict[str, str]] = []
        for role, content in turns:
            if role != "system" and merged and merged[-1]["role"] == role:
                merged[-1]["content"] += "\n\n" + content
            else:
                merged.append({"role": role, "content": content})
        talk = [m for m in merged if m["role"] != "system"]
        if not talk or talk[0]["role"] != "user":
            raise ApiError(400, "messages: the first non-system message must have the user role", param="messages")
        if talk[-1]["role"] != "user":
            raise ApiError(400, "messages: the last message must have the user role (this server does not continue "
                                "a partial assistant message)", param="messages")
        return ([{"role": "system", "content": system}] if system else []) + merged


def _require_dict(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _messages_list(body: dict) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: must be a non-empty list", param="messages")
    return messages


def parse_anthropic(body: Any, parser: Parser) -> tuple[ChatRequest, str]:
    body = _require_dict(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: Field required (a model name string)")
    if "max_tokens" not in body:
        raise ApiError(400, "max_tokens: Field required")
    max_tokens = parser.max_tokens(body["max_tokens"], "max_tokens")
    for key in ("tools", "tool_choice"):
        if body.get(key):
            raise ApiError(400, f"{key}: tool use is not supported by this server")
    system = body.get("system")
    if isinstance(system, list):
        for i, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise ApiError(400, f"system.{i}: system blocks must be text blocks")
        system = "\n\n".join(Parser.text(b.get("text"), f"system.{i}.text") for i, b in enumerate(system))
    elif system is not None:
        system = Parser.text(system, "system")
    images: list[bytes] = []
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(_messages_list(body)):
        where = f"messages.{i}"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            role = message.get("role") if isinstance(message, dict) else None
            raise ApiError(400, f"{where}.role: must be 'user' or 'assistant', got {role!r} (put system prompts in "
                                "the top-level system field)")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not content:
            raise ApiError(400, f"{where}.content: must be a non-empty string or list of content blocks")
        parts = []
        for j, block in enumerate(content):
            at = f"{where}.content.{j}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                parts.append(Parser.text(block.get("text"), f"{at}.text"))
            elif kind == "image":
                if message["role"] != "user":
                    raise ApiError(400, f"{at}: images are only allowed in user messages")
                source = block.get("source")
                if not isinstance(source, dict) or source.get("type") != "base64":
                    got = source.get("type") if isinstance(source, dict) else source
                    raise ApiError(400, f"{at}.source.type: only 'base64' image sources are accepted, got {got!r} "
                                        "(this server does not fetch URLs or files)")
                images.append(parser.image(source.get("data"), source.get("media_type"), f"{at}.source"))
                parts.append(IMAGE_TOKEN)
            else:
                raise ApiError(400, f"{at}.type: unsupported content type {kind!r}; this server accepts 'text' and "
                                    "'image'")
        text = "\n".join(parts)
        if not text.strip():
            raise ApiError(400, f"{where}.content: must not be empty")
        turns.append((message["role"], text))
    options = {
        "max_new_tokens": max_tokens,
        "temperature": Parser.number(body, "temperature", 0, 1),
        "top_p": Parser.number(body, "top_p", 0, 1, low_open=True),
        "top_k": Parser.number(body, "top_k", 0, 10**6, integer=True),
        "stop": Parser.stops(body.get("stop_sequences"), "stop_sequences"),
    }
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: must be true or false")
    return ChatRequest(parser.conversation(turns, system, images), images, options, stream), model


_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)(?:;[\w=.+-]+)*?;base64,(?P<data>.*)", re.DOTALL)


def parse_openai(body: Any, parser: Parser) -> tuple[ChatRequest, str]:
    body = _require_dict(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: you must provide a model name", param="model")
    for key in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(key):
            raise ApiError(400, f"{key}: tool use is not supported by this server", param=key)
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n: only n=1 is supported", param="n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get(key) is not None:
        max_tokens = parser.max_tokens(body[key], key)
    else:
        max_tokens = min(parser.settings.default_max_tokens, parser.tokens_limit)
    images: list[bytes] = []
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(_messages_list(body)):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where}.role: unsupported role {role!r}; use system, developer, user or assistant",
                           param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not content:
            raise ApiError(400, f"{where}.content: must be a non-empty string or list of content parts",
                           param=f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(Parser.text(part.get("text"), f"{at}.text"))
            elif kind == "image_url":
                if role != "user":
                    raise ApiError(400, f"{at}: images are only allowed in user messages", param=at)
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                found = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
                if found is None:
                    raise ApiError(400, f"{at}.image_url.url: send the image inline as a data:image/...;base64,... "
                                        "URL (this server does not fetch remote URLs)", param=f"{at}.image_url")
                images.append(parser.image(found["data"], found["type"], f"{at}.image_url"))
                parts.append(IMAGE_TOKEN)
            else:
                raise ApiError(400, f"{at}.type: unsupported content type {kind!r}; this server accepts 'text' and "
                                    "'image_url'", param=f"{at}.type")
        text = "\n".join(parts)
        if not text.strip():
            raise ApiError(400, f"{where}.content: must not be empty", param=f"{where}.content")
        turns.append((role, text))
    options = {
        "max_new_tokens": max_tokens,
        "temperature": Parser.number(body, "temperature", 0, 2),
        "top_p": Parser.number(body, "top_p", 0, 1, low_open=True),
        "stop": Parser.stops(body.get("stop"), "stop"),
        "seed": Parser.number(body, "seed", -(2**63), 2**63 - 1, integer=True),
    }
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: must be true or false", param="stream")
    stream_options = body.get("stream_options") or {}
    include_usage = bool(stream_options.get("include_usage")) if isinstance(stream_options, dict) else False
    return ChatRequest(parser.conversation(turns, None, images), images, options, stream, include_usage), model


# ---- responses ----


def _sse(event: str | None, data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "").encode() + f"data: {payload}\n\n".encode()


def anthropic_stop(completion: Completion) -> str:
    return "end_turn" if completion.stop_reason == "cancelled" else completion.stop_reason


def openai_finish(completion: Completion) -> str:
    return "length" if completion.stop_reason == "max_tokens" else "stop"


def anthropic_message(msg_id: str, model: str, completion: Completion) -> dict:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": completion.text}], "stop_reason": anthropic_stop(completion),
            "stop_sequence": completion.stop_sequence,
            "usage": {"input_tokens": completion.input_tokens, "output_tokens": completion.output_tokens}}


def openai_usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.input_tokens, "completion_tokens": completion.output_tokens,
            "total_tokens": completion.input_tokens + completion.output_tokens}


def openai_completion(cmpl_id: str, model: str, created: int, completion: Completion) -> dict:
    return {"id": cmpl_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text, "refusal": None},
                         "finish_reason": openai_finish(completion), "logprobs": None}],
            "usage": openai_usage(completion)}


Events = AsyncIterator[tuple[str, Any]]


async def anthropic_events(msg_id: str, model: str, input_tokens: int, events: Events) -> AsyncIterator[bytes]:
    """message_start, content_block_start, ping, content_block_delta..., content_block_stop, message_delta,
    message_stop: the order the Anthropic SDK's stream accumulator expects."""
    yield _sse("message_start", {"type": "message_start", "message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 0}}})
    yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})
    yield _sse("ping", {"type": "ping"})
    async for kind, value in events:
        if kind == "text":
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": value}})
        elif kind == "error":
            yield _sse("error", error_body(ANTHROPIC, 500, str(value)))
            return
        elif kind == "done":
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            yield _sse("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": anthropic_stop(value),
                                                   "stop_sequence": value.stop_sequence},
                                         "usage": {"input_tokens": value.input_tokens,
                                                   "output_tokens": value.output_tokens}})
            yield _sse("message_stop", {"type": "message_stop"})


async def openai_events(cmpl_id: str, model: str, created: int, include_usage: bool,
                        events: Events) -> AsyncIterator[bytes]:
    """chat.completion.chunk objects: the role, the content deltas, the finish reason, usage if asked, [DONE]."""
    def chunk(delta: dict, finish: str | None = None) -> bytes:
        body = {"id": cmpl_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if include_usage:
            body["usage"] = None
        return _sse(None, body)

    yield chunk({"role": "assistant", "content": ""})
    async for kind, value in events:
        if kind == "text":
            yield chunk({"content": value})
        elif kind == "error":
            yield _sse(None, error_body(OPENAI, 500, str(value)))
            return
        elif kind == "done":
            yield chunk({}, openai_finish(value))
            if include_usage:
                yield _sse(None, {"id": cmpl_id, "object": "chat.completion.chunk", "created": created,
                                  "model": model, "choices": [], "usage": openai_usage(value)})
            yield b"data: [DONE]\n\n"


# ---- the server ----


class Server:
    """Admission control and the worker pool around one ChatModel."""

    def __init__(self, chat: ChatModel, settings: ServeSettings):
        chat.options(temperature=settings.temperature)  # a bad default temperature fails here, not per request
        self.chat = chat.with_image_limit(settings.max_image_pixels)
        self.settings = settings
        self.model_name = settings.model_name or chat.name
        self.pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="vlm-generate")
        self.capacity = settings.max_concurrency + settings.max_queue
        self.admitted = 0  # running + waiting; guarded by self.lock (released from worker threads)
        self.running = 0
        self.finished = Counter()  # stop reasons of finished generations, for /health
        self.lock = threading.Lock()
        self.parser = Parser(settings, settings.max_tokens_limit or chat.context_length)

    def admit(self, api: str) -> None:
        with self.lock:
            if self.admitted >= self.capacity:
                status = 529 if api == ANTHROPIC else 429
                raise ApiError(status, f"the server is busy ({self.capacity} requests running or queued); retry soon")
            self.admitted += 1

    def release(self) -> None:
        with self.lock:
            self.admitted -= 1

    def health(self) -> dict:
        with self.lock:
            return {"status": "ok", "model": self.model_name, "running": self.running,
                    "queued": self.admitted - self.running, "capacity": self.capacity, "finished": dict(self.finished)}

    def options(self, request: ChatRequest) -> dict[str, Any]:
        options = {k: v for k, v in request.options.items() if v not in (None, [])}
        options.setdefault("temperature", self.settings.temperature)
        return options

    def _job(self, request: ChatRequest, cancel: threading.Event, emit: Callable[[str, Any], None] | None):
        """Runs on a worker thread: encode (tiler + template), then generate; always frees the slot."""
        try:
            if cancel.is_set():
                return None  # the client left while this request waited
            with self.lock:
                self.running += 1
            try:
                prompt = self.chat.prepare(request.messages, request.images)
                if emit is None:
                    completion = self.chat.generate(prompt, cancel=cancel, **self.options(request))
                else:
                    emit("start", prompt.input_tokens)
                    with self.chat.stream(prompt, cancel=cancel, **self.options(request)) as stream:
                        for piece in stream:
                            emit("text", piece)
                    completion = stream.completion
                    emit("done", completion)
                with self.lock:
                    self.finished[completion.stop_reason] += 1
                return completion
            finally:
                with self.lock:
                    self.running -= 1
        except Exception as err:
            if emit is None:
                raise
            emit("error", err)
            return None
        finally:
            self.release()

    async def complete(self, http: Request, request: ChatRequest, api: str) -> Completion:
        self.admit(api)
        cancel = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self.pool, self._job, request, cancel, None)
        watcher = asyncio.create_task(_watch_disconnect(http, cancel))
        try:
            # shield: if this handler is cancelled the job still runs (and sees `cancel`) so its slot is freed
            completion = await asyncio.shield(future)
            if completion is None:  # skipped: the client left while it waited; nobody reads this answer
                raise ApiError(499, "the client closed the request")
            return completion
        except (PromptError, ImageLoadError, OptionError) as err:
            raise ApiError(400, str(err)) from None
        except asyncio.CancelledError:
            cancel.set()
            raise
        finally:
            watcher.cancel()

    async def stream(self, request: ChatRequest, api: str,
                     render: Callable[[int, Events], AsyncIterator[bytes]]) -> StreamingResponse:
        self.admit(api)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def emit(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (shutdown): stop generating
                cancel.set()

        loop.run_in_executor(self.pool, self._job, request, cancel, emit)  # the job reports through `emit`
        try:
            kind, value = await queue.get()  # encoding errors still get a proper 4xx before any event is sent
        except asyncio.CancelledError:
            cancel.set()
            raise
        if kind == "error":
            cancel.set()
            if isinstance(value, PromptError | ImageLoadError | OptionError):
                raise ApiError(400, str(value))
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
                cancel.set()  # normal end: no-op; a client that disconnected: stop its generation now

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


async def _watch_disconnect(http: Request, cancel: threading.Event) -> None:
    while not cancel.is_set():
        if await http.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.2)


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing (413) anything over `limit` bytes, by header or as it arrives."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared):,} bytes, over the {limit:,}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the {limit:,}-byte limit")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None


def check_key(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "invalid or missing API key (send x-api-key: KEY or Authorization: Bearer KEY)")


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

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        if err.status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, err.message)
        return error_response(api_of(request), err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(api_of(request), ApiError(err.status_code, str(err.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(api_of(request), ApiError(500, f"internal error: {type(err).__name__}"))

    @app.get("/health")
    async def health() -> dict:
        return server.health()

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request, settings.api_key)
        name, now = server.model_name, int(time.time())
        # one body both SDKs read: OpenAI's list of models and Anthropic's page of ModelInfo
        entry = {"id": name, "object": "model", "type": "model", "created": now, "owned_by": "vlm",
                 "display_name": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}
        return {"object": "list", "data": [entry], "has_more": False, "first_id": name, "last_id": name}

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        check_key(request, settings.api_key)
        chat, _ = parse_anthropic(await read_json(request, settings.max_body_bytes), server.parser)
        msg_id = f"msg_{uuid.uuid4().hex[:24]}"
        if chat.stream:
            return await server.stream(chat, ANTHROPIC, lambda tokens, events: anthropic_events(
                msg_id, server.model_name, tokens, events))
        completion = await server.complete(request, chat, ANTHROPIC)
        return JSONResponse(anthropic_message(msg_id, server.model_name, completion))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request, settings.api_key)
        chat, _ = parse_openai(await read_json(request, settings.max_body_bytes), server.parser)
        cmpl_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            return await server.stream(chat, OPENAI, lambda tokens, events: openai_events(
                cmpl_id, server.model_name, created, chat.include_usage, events))
        completion = await server.complete(request, chat, OPENAI)
        return JSONResponse(openai_completion(cmpl_id, server.model_name, created, completion))

    return app


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="serve")
def serve(cfg: DictConfig) -> None:
    import uvicorn

    values = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    try:
        settings = ServeSettings.from_dict(values)
    except (TypeError, ValueError) as err:
        fail(str(err))
    _setup_logging(settings.log_level)
    if not settings.checkpoint:
        fail("checkpoint=PATH is required: an align or sft export folder")
    if not Path(settings.checkpoint).expanduser().is_dir():
        fail(f"checkpoint folder {settings.checkpoint!r} does not exist")
    with user_errors():
        try:
            chat = ChatModel.load(settings.checkpoint, device=settings.device, dtype=settings.dtype,
                                  name=settings.model_name)
            chat.options(temperature=settings.temperature)  # checks the default temperature now, not per request
        except (OptionError, RuntimeError) as err:
            fail(str(err))
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("listening on %s without api_key: anyone who can reach port %d can use the model",
                    settings.host, settings.port)
    log.info("serving %s on http://%s:%d (POST /v1/messages, POST /v1/chat/completions)",
             chat.name, settings.host, settings.port)
    uvicorn.run(create_app(chat, settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=5)


def main() -> None:
    preflight(sys.argv[1:], "serve")
    serve()


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, format="[%(name)s] %(message)s", level=logging.WARNING, force=True)
    try:
        logging.getLogger("vlm").setLevel(level.upper())
    except ValueError:
        fail(f"log_level={level!r} is not a logging level; use DEBUG, INFO, WARNING or ERROR")


if __name__ == "__main__":
    main()
