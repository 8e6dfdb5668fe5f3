"""The Anthropic Messages API (`POST /v1/messages`): parsing a request (text and base64 image blocks, system,
stop_sequences), the message it answers with, and the SSE event sequence the `anthropic` SDK expects when streaming.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from vlm.generation.completion import Completion
from vlm.server.errors import ANTHROPIC, ApiError, stream_error_body
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

_TOOLS = ("tool use is not supported by this server", (None, [], {}, {"type": "none"}))
UNSUPPORTED: Unsupported = {
    "tools": _TOOLS, "tool_choice": _TOOLS,
    "thinking": ("extended thinking is not supported by this server", (None, {"type": "disabled"})),
    "mcp_servers": ("MCP servers (remote tools) are not supported by this server", (None, [])),
}
# the Messages API's request fields (its beta ones included); the rest are refused as typos
API_FIELDS = frozenset({
    "model", "messages", "max_tokens", "system", "temperature", "top_p", "top_k", "stop_sequences", "stream",
    "metadata", "service_tier", "output_config", "container", "context_management", "cache_control", "inference_geo",
    "speed", "diagnostics", "user_profile_id", "workspace_id", *UNSUPPORTED,
})
EFFORTS = (None, "low", "medium", "high")  # output_config.effort: how much to spend; this server spends it alike


def _check_output_config(config: Any) -> None:
    """`output_config`: a JSON schema `format` (structured output) is refused, since answering without it would look
    like success; an `effort` is taken and needs nothing done."""
    if config is None:
        return
    if not isinstance(config, dict):
        raise ApiError(400, "output_config: must be an object")
    if config.get("format") is not None:
        raise ApiError(400, "output_config.format: structured output (a JSON schema format) is not supported by this "
                            "server; ask for the format in the prompt")
    if config.get("effort") not in EFFORTS:
        raise ApiError(400, f"output_config.effort: must be one of low, medium, high, got {config['effort']!r}")


def parse_anthropic(body: Any, parser: Parser) -> tuple[ChatRequest, str]:
    body = require_dict(body)
    refuse_unknown_fields(body, API_FIELDS, "Messages API")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: Field required (a model name string)")
    if "max_tokens" not in body:
        raise ApiError(400, "max_tokens: Field required")
    max_tokens = parser.max_tokens(body["max_tokens"], "max_tokens")
    if found := unsupported_field(body, UNSUPPORTED):
        raise ApiError(400, f"{found[0]}: {found[1]}")
    _check_output_config(body.get("output_config"))
    system = _system(body.get("system"), parser)
    reader = TurnReader(parser)
    for i, message in enumerate(messages_list(body)):
        _read_message(message, f"messages.{i}", reader)
    options = {
        "max_new_tokens": max_tokens,
        "temperature": Parser.number(body, "temperature", 0, 1),
        "top_p": Parser.number(body, "top_p", 0, 1),
        "top_k": Parser.number(body, "top_k", 0, 10**6, integer=True),
        "stop": Parser.stops(body.get("stop_sequences"), "stop_sequences", one_string=False),
        "kv_cache": Parser.kv_cache(body),
    }
    stream = body.get("stream") or False  # null: the default, as for the other optional fields
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: must be true or false")
    return reader.request(system, options, stream), model


def _system(system: Any, parser: Parser) -> str | None:
    """The top-level `system` field: a string, or a list of text blocks joined by blank lines."""
    if not isinstance(system, list):
        return None if system is None else parser.text(system, "system")
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise ApiError(400, f"system.{i}: system blocks must be text blocks")
    return "\n\n".join(parser.text(b.get("text"), f"system.{i}.text") for i, b in enumerate(system))


def _read_message(message: Any, where: str, reader: TurnReader) -> None:
    """One of `messages`: a user, assistant or system turn of text and (user turns only) base64 image blocks. A
    system message stands where it is sent; the top-level `system` field opens the conversation."""
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ("user", "assistant", "system"):
        raise ApiError(400, f"{where}.role: must be 'user', 'assistant' or 'system', got {role!r}")
    reader.add_turn(role, content_blocks(message.get("content"), where, "content blocks"), where,
                    f"{where}.content.{{}}", "image", _base64_source)


def _base64_source(block: dict, at: str) -> tuple[Any, Any, str]:
    """An image block's `source`: only inline base64 (this server fetches nothing)."""
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") != "base64":
        got = source.get("type") if isinstance(source, dict) else source
        raise ApiError(400, f"{at}.source.type: only 'base64' image sources are accepted, got {got!r} (this server "
                            "does not fetch URLs or files)")
    return source.get("data"), source.get("media_type"), f"{at}.source"


def anthropic_stop(completion: Completion) -> str:
    return "end_turn" if completion.stop_reason == "cancelled" else completion.stop_reason


def anthropic_message(msg_id: str, model: str, completion: Completion) -> dict:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": completion.text}], "stop_reason": anthropic_stop(completion),
            "stop_sequence": completion.stop_sequence,
            "usage": {"input_tokens": completion.input_tokens, "output_tokens": completion.output_tokens}}


async def anthropic_events(msg_id: str, model: str, input_tokens: int, events: Events) -> AsyncIterator[bytes]:
    """message_start, content_block_start, ping, content_block_delta..., content_block_stop, message_delta,
    message_stop: the order the Anthropic SDK's stream accumulator expects."""
    yield sse("message_start", {"type": "message_start", "message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 0}}})
    yield sse("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}})
    yield sse("ping", {"type": "ping"})
    async for kind, value in events:
        if kind == "text":
            yield sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": value}})
        elif kind == "error":
            yield sse("error", stream_error_body(ANTHROPIC, value))
            return
        elif kind == "done":
            yield sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            yield sse("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": anthropic_stop(value),
                                                  "stop_sequence": value.stop_sequence},
                                        "usage": {"input_tokens": value.input_tokens,
                                                  "output_tokens": value.output_tokens}})
            yield sse("message_stop", {"type": "message_stop"})
