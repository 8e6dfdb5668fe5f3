"""Refused requests: `ApiError` and how each API shapes its error JSON (always 4xx for bad input).

Also names the two wire formats (`ANTHROPIC`, `OPENAI`) and tells which one a request speaks (`api_of`), so any
error, even one raised before parsing, comes back in the caller's own shape.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

ANTHROPIC, OPENAI = "anthropic", "openai"


class ApiError(Exception):
    """A request the server refuses; rendered in the calling API's own error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


OVERLOADED = (429, 529)  # the server is busy (OpenAI's status, Anthropic's): the client retries after retry-after
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 529: "overloaded_error"}
_OPENAI_TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}
_OPENAI_CODES = {401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded"}


def error_body(api: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    if api == ANTHROPIC:
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    kind = _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or _OPENAI_CODES.get(status)}}


def stream_error_body(api: str, err: BaseException) -> dict:
    """The error event a stream ends with once its 200 is sent: an ApiError's own status and message, else a 500."""
    if isinstance(err, ApiError):
        return error_body(api, err.status, err.message, err.param, err.code)
    return error_body(api, 500, str(err))


def error_response(api: str, err: ApiError) -> JSONResponse:
    headers = {"retry-after": "1"} if err.status in OVERLOADED else None
    return JSONResponse(error_body(api, err.status, err.message, err.param, err.code), err.status, headers=headers)


def api_of(request: Request) -> str:
    """Anthropic's routes, and any route called by an Anthropic client (its SDK sends `anthropic-version`)."""
    anthropic = request.url.path.startswith("/v1/messages") or "anthropic-version" in request.headers
    return ANTHROPIC if anthropic else OPENAI
