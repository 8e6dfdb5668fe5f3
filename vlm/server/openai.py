"""The OpenAI chat completions API (`POST /v1/chat/completions`): parsing a request (`image_url` parts with `data:`
URLs, the developer role, stop, seed), the completion it answers with and its usage, and the streaming chunks ending
with `data: [DONE]` (usage last when `stream_options.include_usage` asks for it).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from vlm.generation.completion import Completion
from vlm.server.errors import OPENAI, ApiError, stream_error_body
from vlm.server.requests import (
    ChatRequest,
    Parser,
    TurnReader,
    Unsupported,
    content_blocks,
    messages_list,
    refuse_unknown_fields,
    require_dict,
    unsupported_field,
)
from vlm.server.sse import Events, sse

_TOOLS = ("tool use is not supported by this server", (None, [], {}, "none"))
_LOGPROBS = ("log-probabilities are not returned by this server", (None, False, 0))
UNSUPPORTED: Unsupported = {
    "tools": _TOOLS, "functions": _TOOLS, "tool_choice": _TOOLS, "function_call": _TOOLS,
    "logprobs": _LOGPROBS, "top_logprobs": _LOGPROBS,
    "response_format": ("structured output (json_object, json_schema) is not supported by this server; ask for the "
                        "format in the prompt", (None, {"type": "text"})),
    "logit_bias": ("logit_bias is not supported by this server", (None, {})),
    "presence_penalty": ("presence_penalty is not supported by this server", (None, 0)),
    "frequency_penalty": ("frequency_penalty is not supported by this server", (None, 0)),
    "modalities": ("this server answers in text only", (None, ["text"])),
    "audio": ("this server answers in text only", (None,)),
    "web_search_options": ("web search is not supported by this server", (None,)),
}
# the chat completions API's request fields; the rest are refused as typos
API_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "stream",
    "stream_options", "seed", "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
    "prompt_cache_options", "prompt_cache_retention", "reasoning_effort", "verbosity", "prediction", "moderation",
    "parallel_tool_calls", *UNSUPPORTED,
})
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)(?:;[\w=.+-]+)*?;base64,(?P<data>.*)",
                       re.DOTALL | re.IGNORECASE)  # media types and the base64 marker are case-insensitive


def parse_openai(body: Any, parser: Parser) -> tuple[ChatRequest, str]:
    body = require_dict(body)
    refuse_unknown_fields(body, API_FIELDS, "chat completions API")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: you must provide a model name", param="model")
    if found := unsupported_field(body, UNSUPPORTED):
        raise ApiError(400, f"{found[0]}: {found[1]}", param=found[0])
    if body.get("n") is not None and Parser.number(body, "n", 1, 2**31 - 1, integer=True) != 1:
        raise ApiError(400, "n: only n=1 is supported", param="n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get(key) is not None:
        max_tokens = parser.max_tokens(body[key], key)
    else:
        max_tokens = min(parser.settings.default_max_tokens, parser.tokens_limit)
    reader = TurnReader(parser)
    for i, message in enumerate(messages_list(body)):
        _read_message(message, f"messages[{i}]", reader)
    options = {
        "max_new_tokens": max_tokens,
        "temperature": Parser.number(body, "temperature", 0, 2),
        "top_p": Parser.number(body, "top_p", 0, 1),
        "top_k": Parser.number(body, "top_k", 0, 10**6, integer=True),  # not OpenAI's; vLLM's and the Messages API's
        "stop": Parser.stops(body.get("stop"), "stop", one_string=True),
        "kv_cache": Parser.kv_cache(body),
        "seed": Parser.number(body, "seed", -(2**63), 2**63 - 1, integer=True),
    }
    stream = body.get("stream") or False  # null: the default, as the API's schema allows
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: must be true or false", param="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options: must be an object, e.g. {\"include_usage\": true}", param="stream_options")
    if stream_options and not stream:  # as OpenAI's API and vLLM answer it
        raise ApiError(400, "stream_options: only allowed when stream is true", param="stream_options")
    include_usage = stream_options.get("include_usage")
    include_usage = False if include_usage is None else include_usage  # null: the default
    if not isinstance(include_usage, bool):
        raise ApiError(400, "stream_options.include_usage: must be true or false", param="stream_options.include_usage")
    return reader.request(None, options, stream, include_usage), model


def _read_message(message: Any, where: str, reader: TurnReader) -> None:
    """One of `messages`: a system (or developer), user or assistant turn of text and (user turns only) images as
    data URLs."""
    role = message.get("role") if isinstance(message, dict) else None
    role = "system" if role == "developer" else role
    if role not in ("system", "user", "assistant"):
        raise ApiError(400, f"{where}.role: unsupported role {role!r}; use system, developer, user or assistant",
                       param=f"{where}.role")
    if role == "assistant" and message.get("tool_calls"):
        raise ApiError(400, f"{where}.tool_calls: {_TOOLS[0]}", param=f"{where}.tool_calls")
    # an assistant message may be empty or have null content (a reply that was only a stop sequence): the API allows it
    empty_reply = role == "assistant" and not message.get("content")
    blocks = [] if empty_reply else content_blocks(message.get("content"), where, "content parts")
    reader.add_turn(role, blocks, where, f"{where}.content[{{}}]", "image_url", _data_url_source,
                    empty_ok=role == "assistant")


def _data_url_source(part: dict, at: str) -> tuple[Any, Any, str]:
    """An image_url part's URL: only an inline data: URL (this server fetches nothing)."""
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    found = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
    if found is None:
        if isinstance(url, str) and url[:5].lower() == "data:":
            raise ApiError(400, f"{at}.image_url.url: this data: URL names no media type or is not base64; write it "
                                "as data:image/png;base64,... (or image/jpeg, ...)", param=f"{at}.image_url")
        raise ApiError(400, f"{at}.image_url.url: send the image inline as a data:image/...;base64,... URL (this "
                            "server does not fetch remote URLs)", param=f"{at}.image_url")
    media_type = found["type"].lower()
    media_type = "image/jpeg" if media_type == "image/jpg" else media_type  # a common misspelling
    return found["data"], media_type, f"{at}.image_url"


def openai_finish(completion: Completion) -> str:
    return "length" if completion.stop_reason in ("max_tokens", "model_context_window_exceeded") else "stop"


def openai_usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.input_tokens, "completion_tokens": completion.output_tokens,
            "total_tokens": completion.input_tokens + completion.output_tokens}


def openai_completion(cmpl_id: str, model: str, created: int, completion: Completion) -> dict:
    return {"id": cmpl_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text, "refusal": None},
                         "finish_reason": openai_finish(completion), "logprobs": None}],
            "usage": openai_usage(completion)}


async def openai_events(cmpl_id: str, model: str, created: int, include_usage: bool,
                        events: Events) -> AsyncIterator[bytes]:
    """chat.completion.chunk objects: the role, the content deltas, the finish reason, usage if asked, [DONE]."""
    def chunk(delta: dict, finish: str | None = None) -> bytes:
        body = {"id": cmpl_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if include_usage:
            body["usage"] = None
        return sse(None, body)

    yield chunk({"role": "assistant", "content": ""})
    async for kind, value in events:
        if kind == "text":
            yield chunk({"content": value})
        elif kind == "error":
            yield sse(None, stream_error_body(OPENAI, value))
            return
        elif kind == "done":
            yield chunk({}, openai_finish(value))
            if include_usage:
                yield sse(None, {"id": cmpl_id, "object": "chat.completion.chunk", "created": created,
                                 "model": model, "choices": [], "usage": openai_usage(value)})
            yield b"data: [DONE]\n\n"
