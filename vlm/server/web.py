"""The browser chat page: `GET /` (index.html), `GET /web/chat.css` and `/web/chat.js`, and `GET /web/config`, the
limits and defaults the page needs before it calls the APIs (images per request, image bytes, the tiler's pixel
budget, tokens, the KV cache).

The page is static (vlm/server/web/, shipped as package data: no build step, no CDN) and talks to the server only
through the public Messages API, so it can do nothing a client could not. Its Content-Security-Policy allows only
this origin's own script and style, as a second line behind the page never inserting model output as HTML.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import Response

from vlm.generation.options import H2OSettings
from vlm.server.requests import MEDIA_TYPES

if TYPE_CHECKING:
    from vlm.server.app import Server

WEB_DIR = Path(__file__).with_name("web")
ASSETS = {"chat.css": "text/css; charset=utf-8", "chat.js": "text/javascript; charset=utf-8"}
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                           "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
# no-cache: a browser revalidates, so a server upgraded in place never runs yesterday's script against today's APIs
HEADERS = {"cache-control": "no-cache", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def page_url(host: str, port: int) -> str:
    """The address a browser on this machine opens: a wildcard bind is reached through loopback."""
    shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def page_config(server: Server) -> dict:
    """What the page must know up front. `image_pixels` is the tiler's budget (max_tiles tiles of tile_size^2): a
    photo scaled down to that area gets the same grid and tiles, so the page downscales larger ones before upload."""
    tiler = server.chat.processor.tiler
    settings = server.settings
    return {"max_images": settings.max_images, "max_image_bytes": settings.max_image_bytes,
            "image_pixels": tiler.config.max_tiles * tiler.tile_size ** 2, "media_types": list(MEDIA_TYPES),
            "max_tokens": min(settings.default_max_tokens, server.parser.tokens_limit),
            "max_tokens_limit": server.parser.tokens_limit, "context_tokens": server.chat.context_length,
            "temperature": settings.temperature, "kv_cache": settings.kv_cache, "h2o_budget": h2o_budget(settings.h2o),
            "api_key_required": bool(settings.api_key)}


def h2o_budget(h2o: H2OSettings) -> str:
    """The server's H2O budget in words, for the page's KV-cache setting: "the first 4 tokens, the 10% of the prompt
    most attended to and the newest 10% of the prompt"."""
    def amount(value: int | float) -> str:
        return f"{value * 100:g}% of the prompt" if isinstance(value, float) else f"{value} token{'s' * (value != 1)}"

    heavy = f", the {amount(h2o.heavy)} most attended to" if h2o.heavy else ""  # heavy=0: a recent-only window
    return f"the first {amount(h2o.sinks)}{heavy} and the newest {amount(h2o.recent)}"


def web_router(server: Server) -> APIRouter:
    """Routes for the page, its two assets and its config; the files are read once, here."""
    router = APIRouter()
    page = (WEB_DIR / "index.html").read_bytes()
    assets = {name: (WEB_DIR / name).read_bytes() for name in ASSETS}

    @router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: uptime checks and curl -I
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={**HEADERS, "content-security-policy": CONTENT_SECURITY_POLICY})

    @router.get("/web/config", include_in_schema=False)
    async def config() -> dict:
        return page_config(server)

    def asset_route(name: str) -> None:
        async def asset() -> Response:
            return Response(assets[name], media_type=ASSETS[name], headers=HEADERS)

        router.add_api_route(f"/web/{name}", asset, methods=["GET"], include_in_schema=False)

    for name in ASSETS:
        asset_route(name)
    return router
