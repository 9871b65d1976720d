"""The chat page of `moa-local serve`: GET / (the page) and GET /static/<file> (its CSS and script), package data in
server/static/ with no build step. The page calls the app's own /v1 API like any client: GET /v1/models, then
POST /v1/chat/completions with "stream": true and "moa_events": true (the events are described in docs/server.md).

Owns only these static routes and their headers. Never touches the API routes, the engines or the key check: the
page itself needs no key (it holds no data); it asks the user for one when the API answers 401.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

PAGE = "chat.html"
ASSETS = {"chat.css": "text/css; charset=utf-8", "chat.js": "text/javascript; charset=utf-8"}

# Everything from this server, nothing from anywhere else; no inline script, no framing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer"}


@cache
def static_bytes(name: str) -> bytes:
    """A file of moa_local/server/static."""
    return resources.files("moa_local.server").joinpath("static", name).read_bytes()


def mount_page(app: Any) -> None:
    """Add GET / and GET /static/{name} to a FastAPI ``app``. Unknown static names are the app's usual 404."""
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        return Response(static_bytes(PAGE), media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def chat_asset(name: str) -> Response:
        if name not in ASSETS:  # a fixed list: no path is ever built from the request
            raise HTTPException(404, f"no static file '{name}'")
        return Response(static_bytes(name), media_type=ASSETS[name], headers=HEADERS)
