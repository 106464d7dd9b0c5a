"""Which web pages may use Relay from a browser: the WebSocket `Origin` check and CORS for `/api`.

Browsers put the page's origin in `Origin` on every WebSocket handshake and cross-origin request,
and a page cannot change it. Checking it stops a malicious page from opening a stream with
credentials the visitor's browser holds (cross-site WebSocket hijacking). It is no defence
against a client that holds a token itself (`relay tail`, scripts), which may send any `Origin`
or none; so a handshake without `Origin` is allowed and the token decides.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

from starlette.datastructures import URL
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from service.core.errors import Forbidden
from service.core.origins import ANY, normal_origin

log = logging.getLogger("relay.origins")


def own_origins(url: URL, public_url: str) -> set[str]:
    """The origins of pages this Relay serves: the request's own scheme and `Host` (the scheme
    from `X-Forwarded-Proto` when uvicorn trusts the proxy), and `RELAY_PUBLIC_URL`."""
    found = {normal_origin(f"{url.scheme}://{url.netloc}"), normal_origin(public_url) if public_url else None}
    return {origin for origin in found if origin is not None}


def require_origin(origin: str | None, url: URL, allowed: Collection[str], public_url: str) -> None:
    """Forbidden unless the handshake comes from no browser, this Relay's own pages, or an
    origin in RELAY_ALLOWED_ORIGINS (`*`: any)."""
    if origin is None or ANY in allowed:
        return
    own = own_origins(url, public_url)
    if normal_origin(origin) in {*own, *allowed}:
        return
    log.info(
        "refused a WebSocket handshake from origin %r: this server is %s; add the origin to "
        "RELAY_ALLOWED_ORIGINS, or set RELAY_PUBLIC_URL if this is Relay's own page behind a proxy",
        origin[:100],
        " or ".join(sorted(own)),
    )
    raise Forbidden("this page's origin may not open Relay streams")


class ApiCors:
    """Starlette's CORSMiddleware for `/api/*` only: the admin, webhook and reading routes never
    answer cross-origin requests. Bearer tokens, not cookies, so no credentials mode."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = scope["type"] == "http" and scope["path"].startswith("/api/")
        await (self.cors if api else self.app)(scope, receive, send)
