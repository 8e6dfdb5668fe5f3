"""Who may call the server: the API key, and the guard against web pages that would use it through a browser.

A browser lets any web page send a "simple" POST (text/plain, no preflight) to any address, 127.0.0.1 included, and
DNS rebinding lets a page read the answers too, by pointing its own host name at 127.0.0.1. So:
- a request whose `Origin` (sent by browsers, never by SDKs or curl) is not the address it was sent to is refused:
  the chat page itself is same-origin, and no other page could read a reply anyway (the server sends no CORS headers);
- a server bound to a loopback address answers only requests addressed to a loopback name (`Host`), unless
  `allowed_hosts` names the host, as a reverse proxy's public name.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from urllib.parse import urlsplit

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from vlm.server.errors import ApiError, api_of, error_response

log = logging.getLogger("vlm.serve")

LOOPBACK_NAMES = ("localhost",)


def check_key(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "invalid or missing API key (send x-api-key: KEY or Authorization: Bearer KEY)")


def is_loopback(host: str) -> bool:
    """`host` (a name or an address, IPv6 with or without brackets) names this machine only."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(authority: str) -> str:
    """"example.com:8000" -> "example.com", "[::1]:8000" -> "::1"."""
    return (urlsplit(f"//{authority}").hostname or "").lower()


def foreign_request(request: Request, bound_to: str, allowed_hosts: list[str]) -> str | None:
    """Why a browser request from another site, or one addressed by a rebound name, is refused; None if it is not."""
    authority = request.headers.get("host", "")
    host = _host_name(authority)
    allowed = {h.lower() for h in allowed_hosts}
    if is_loopback(bound_to) and not is_loopback(host) and host not in allowed:
        return (f"Host {authority!r} is not this server's address: bound to {bound_to}, it answers requests addressed "
                f"to localhost or a loopback address only (add the name to allowed_hosts to serve it)")
    origin = request.headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if parts.netloc.lower() != authority.lower() and (parts.hostname or "").lower() not in allowed:
            return (f"requests from web pages of other sites are refused (Origin {origin!r}); call the API from your "
                    f"own code, or add that site's host name to allowed_hosts")
    return None



class SameSiteOnly:
    """ASGI middleware refusing `foreign_request`s with 403 before any route runs. (Pure ASGI: Starlette's
    BaseHTTPMiddleware would cancel streaming answers it wraps.)"""

    def __init__(self, app: ASGIApp, bound_to: str, allowed_hosts: list[str]) -> None:
        self.app, self.bound_to, self.allowed_hosts = app, bound_to, allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            if problem := foreign_request(request, self.bound_to, self.allowed_hosts):
                log.warning("refused %s %s: %s", request.method, request.url.path, problem)
                await error_response(api_of(request), ApiError(403, problem))(scope, receive, send)
                return
        await self.app(scope, receive, send)
