"""What both APIs share on the way in: the request model (`ChatRequest`), reading the body under its size limit,
image decoding and sniffing, and the common field checks (`Parser`). Every failure is an `ApiError` naming the field.

Images are only accepted inline (base64 of a JPEG, PNG, GIF or WebP whose bytes match the declared type); the server
never fetches URLs or files. An image over `max_image_pixels` is refused from its header, before any decoding.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from PIL import Image

from vlm.config import closest
from vlm.data.processor import PROMPT_NAME, image_label
from vlm.data.tiler import pil_bomb_limit, sniff_media_type
from vlm.data.tokenizer import IMAGE_TOKEN, joined_parts
from vlm.errors import is_text
from vlm.generation.completion import ContextOverflow
from vlm.generation.options import KV_CACHES
from vlm.server.errors import ApiError
from vlm.server.settings import ServeSettings

MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


@dataclass
class ChatRequest:
    """A request in this server's terms: a conversation with `<image>` placeholders, its images and options."""

    messages: list[dict[str, str]]
    images: list[bytes]
    options: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    image_fields: list[str] = field(default_factory=list)  # where each image was in the request, for errors

    def error(self, err: Exception) -> ApiError:
        """A 400 for a request the model could not take (a prompt too long, an undecodable image, a bad option);
        an image is named by its field in the request."""
        index = getattr(err, "image_index", None)
        if isinstance(err, ContextOverflow):  # OpenAI's code for it, which clients read to trim the conversation
            return ApiError(400, str(err), param="messages", code="context_length_exceeded")
        if index is None or index >= len(self.image_fields):
            return ApiError(400, str(err))
        where, label = self.image_fields[index], image_label(PROMPT_NAME, index, b"")
        return ApiError(400, where + str(err).removeprefix(label), param=where)


class Parser:
    """Shared checks for both APIs; every failure is an ApiError(400) naming the field."""

    def __init__(self, settings: ServeSettings, tokens_limit: int, as_plain_text: Callable[[str], str]) -> None:
        self.settings = settings
        self.tokens_limit = tokens_limit
        self.as_plain_text = as_plain_text  # the model's ChatTemplate.as_plain_text: its markers are its template's

    def image(self, data: Any, media_type: Any, where: str) -> bytes:
        if media_type is None:
            raise ApiError(400, f"{where}: no media_type; give the image's type, one of {list(MEDIA_TYPES)}",
                           param=where)
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
        actual = sniff_media_type(raw)
        if actual is None:
            raise ApiError(400, f"{where}: the data is not a JPEG, PNG, GIF or WebP image", param=where)
        if actual != media_type:
            raise ApiError(400, f"{where}: the image is {actual} but media_type says {media_type}", param=where)
        self.refuse_too_many_pixels(raw, where)
        return raw

    def refuse_too_many_pixels(self, raw: bytes, where: str) -> None:
        """The decompression-bomb guard, from the image's header alone: nothing is decoded for a refused image."""
        limit = self.settings.max_image_pixels
        try:  # opening reads the header only, so PIL's own bomb guard is lifted to learn any size the header claims
            with pil_bomb_limit(sys.maxsize), Image.open(io.BytesIO(raw)) as picture:
                width, height = picture.size
        except Exception:  # a signature that matched, then a broken header
            raise ApiError(400, f"{where}: the image's header cannot be read", param=where) from None
        if width * height > limit:
            raise ApiError(400, f"{where}: the image is {width}x{height} ({width * height:,} pixels), over this "
                                f"server's max_image_pixels={limit:,}", param=where)

    def text(self, value: Any, where: str) -> str:
        """A text block's text, read as the plain characters it spells: `<image>` and the chat template's control
        tokens in it are broken (`as_plain_text`), so text never places an image (images come as image blocks) nor
        opens or ends a turn, whatever role sends it. An answer about SVG or ChatML keeps its meaning."""
        if not isinstance(value, str):
            raise ApiError(400, f"{where}: text must be a string", param=where)
        return self.as_plain_text(value)

    def max_tokens(self, value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ApiError(400, f"{where}: must be an integer >= 1, got {value!r}", param=where)
        if value > self.tokens_limit:
            raise ApiError(400, f"{where}: {value} is over this model's limit of {self.tokens_limit}", param=where)
        return value

    @staticmethod
    def number(body: dict, key: str, low: float, high: float, integer: bool = False) -> Any:
        value = body.get(key)
        if value is None:
            return None
        kind = int if integer else (int, float)
        if not isinstance(value, kind) or isinstance(value, bool) or not low <= value <= high:
            kind_name = "an integer" if integer else "a number"
            raise ApiError(400, f"{key}: must be {kind_name} in [{low}, {high}], got {value!r}", param=key)
        return value

    @staticmethod
    def kv_cache(body: dict) -> str | None:
        """The optional `kv_cache` field (both APIs): "dynamic" or "h2o"; None leaves it to the server's setting."""
        value = body.get("kv_cache")
        if value is not None and value not in KV_CACHES:
            raise ApiError(400, f"kv_cache: must be one of {list(KV_CACHES)}, got {value!r}", param="kv_cache")
        return value

    @staticmethod
    def stops(value: Any, where: str, one_string: bool) -> list[str]:
        """Stop sequences: a list of strings, or with `one_string` (OpenAI's `stop`) a single string too."""
        if value is None:
            return []
        values = [value] if one_string and isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(s, str) and s for s in values) or len(values) > 16:
            raise ApiError(400, f"{where}: must be a list of at most 16 non-empty strings", param=where)
        return values

    def conversation(self, turns: list[tuple[str, str]], system: str | None, images: list[bytes]) -> list[dict]:
        """Merge consecutive same-role turns (as the Anthropic API does), then check that a user turn comes last."""
        if len(images) > self.settings.max_images:
            raise ApiError(400, f"messages: {len(images)} images, over the limit of {self.settings.max_images}",
                           param="messages")
        runs: list[tuple[str, list[str]]] = []  # (role, its consecutive texts): joined once, not a copy per turn
        for role, content in turns:
            if role != "system" and runs and runs[-1][0] == role:
                runs[-1][1].append(content)
            else:
                runs.append((role, [content]))
        merged = [{"role": role, "content": "\n\n".join(texts)} for role, texts in runs]
        talk = [m for m in merged if m["role"] != "system"]
        if not talk:
            raise ApiError(400, "messages: there is no user message, only system ones", param="messages")
        if talk[-1]["role"] != "user":
            raise ApiError(400, "messages: the last message must have the user role (this server does not continue "
                                "a partial assistant message)", param="messages")
        return ([{"role": "system", "content": system}] if system else []) + merged


# (an API's image block, its field in the request) -> (base64 data, declared media type, the field to name in errors)
ImageSource = Callable[[dict, str], tuple[Any, Any, str]]


@dataclass
class TurnReader:
    """A request's messages as they are read: (role, text) turns, where each image is an `<image>` placeholder, and
    the images' bytes with the request field each came from. Each API reads its own message shapes into one."""

    parser: Parser
    turns: list[tuple[str, str]] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    image_fields: list[str] = field(default_factory=list)

    def add_turn(self, role: str, blocks: list, where: str, block_field: str, image_type: str,
                 image_source: ImageSource, empty_ok: bool = False) -> None:
        """One message's content blocks (`content_blocks`: text blocks and, in user turns, image blocks of the API's
        `image_type`, whose data `image_source` reads) as a turn. `block_field` names block j's field
        ("messages.0.content.{}"); `empty_ok`: an empty text is a turn too (OpenAI's assistant replies)."""
        parts = []
        for j, block in enumerate(blocks):
            at = block_field.format(j)
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                parts.append(self.parser.text(block.get("text"), f"{at}.text"))
            elif kind == image_type:
                if role != "user":
                    raise ApiError(400, f"{at}: images are only allowed in user messages", param=at)
                data, media_type, image_field = image_source(block, at)
                self.images.append(self.parser.image(data, media_type, image_field))
                self.image_fields.append(image_field)
                parts.append(IMAGE_TOKEN)
            else:
                raise ApiError(400, f"{at}.type: unsupported content type {kind!r}; this server accepts 'text' and "
                                    f"{image_type!r}", param=f"{at}.type")
        text = joined_parts(parts)
        if not text.strip() and not empty_ok:
            raise ApiError(400, f"{where}.content: must not be empty", param=f"{where}.content")
        self.turns.append((role, text))

    def request(self, system: str | None, options: dict[str, Any], stream: bool,
                include_usage: bool = False) -> ChatRequest:
        conversation = self.parser.conversation(self.turns, system, self.images)
        return ChatRequest(conversation, self.images, options, stream, include_usage, self.image_fields)


def content_blocks(content: Any, where: str, noun: str) -> list:
    """A message's content as a list of blocks: a plain string is one text block. `noun` names the API's blocks."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise ApiError(400, f"{where}.content: must be a non-empty string or list of {noun}", param=f"{where}.content")
    return content


def require_dict(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


Unsupported = dict[str, tuple[str, tuple[Any, ...]]]  # field -> (why it is refused, the values that ask for nothing)


# decoding fields some servers take beyond their API (vLLM, text-generation-inference), which these APIs do not offer;
# vlm.infer and ChatModel.generate do
_OFFLINE_ONLY = "is not offered by this server's APIs; vlm.infer and ChatModel.generate take it"
DECODING_EXTRAS: Unsupported = {
    "num_beams": (f"beam search {_OFFLINE_ONLY}", (None, 1)),
    "repetition_penalty": (f"repetition_penalty {_OFFLINE_ONLY}", (None, 1, 1.0)),
    "length_penalty": (f"length_penalty {_OFFLINE_ONLY}", (None, 1, 1.0)),
}


def unsupported_field(body: dict, features: Unsupported) -> tuple[str, str] | None:
    """The first field of `body` asking for a feature this server lacks (`features`, the API's own, or one of the
    DECODING_EXTRAS), as (field, why): answering without the feature would look like success. Values that ask for
    nothing (null, false, 0, {"type": "text"}, ...) pass."""
    for name, (why, off) in (features | DECODING_EXTRAS).items():
        if body.get(name) not in off:
            return name, why
    return None


# fields this server reads beyond both APIs: the cache choice, and top_k for OpenAI clients (vLLM's and Anthropic's)
VLM_FIELDS = frozenset({"kv_cache", "top_k"})


def refuse_unknown_fields(body: dict, api_fields: frozenset[str], api: str) -> None:
    """A 400 for a top-level field that `api` does not define (`max_token`, `stop_sequence`, ...), as the official
    APIs answer: answering without it would hide the typo. Fields the API defines and this server has no use for
    (`metadata`, `service_tier`, ...) pass; those asking for a feature it lacks are refused by `unsupported_field`."""
    known = api_fields | VLM_FIELDS | DECODING_EXTRAS.keys()
    for name in body:
        if name not in known:
            near = closest(name, sorted(known))
            hint = f" (did you mean {near}?)" if near else ""
            raise ApiError(400, f"{name}: not a field of the {api}{hint}", param=name)


def messages_list(body: dict) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: must be a non-empty list", param="messages")
    return messages


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing (413) anything over `limit` bytes, by header or as it arrives, and (400) anything
    Python cannot turn into text: invalid JSON or UTF-8, nesting too deep to parse, huge integers, lone surrogates."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared):,} bytes, over the {limit:,}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the {limit:,}-byte limit")
        chunks.append(chunk)
    try:  # off the event loop, as the request's parsing: a large body must not stall the other clients' streams
        body = await asyncio.to_thread(_decoded, b"".join(chunks))
    except RecursionError:
        raise ApiError(400, "the request body nests JSON arrays or objects too deeply") from None
    except ValueError as err:  # bad JSON, bad UTF-8, or an integer over Python's 4300-digit conversion limit
        if "int_max_str_digits" in str(err):  # Python's advice is for whoever runs the server, not the caller
            raise ApiError(400, "the request body has a number too long to read (over 4,300 digits)") from None
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None
    return body


def _decoded(raw: bytes) -> Any:
    body = json.loads(raw)
    if _has_lone_surrogate(body):
        raise ApiError(400, "the request body has a string with an unpaired UTF-16 surrogate (\\ud800-\\udfff), "
                            "which is not valid Unicode text")
    return body


def _has_lone_surrogate(body: Any) -> bool:
    """Whether any string in the parsed body holds an unpaired surrogate (valid JSON escapes, but no text can be
    made of them: the tokenizer and the UTF-8 response encoder would fail). Iterative: bodies may be deep."""
    pending = [body]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not is_text(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False
