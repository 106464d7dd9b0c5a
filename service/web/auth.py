"""Authentication as a declared property of each route, checked before its handler runs.

Every route is built here, with the access it needs spelled out next to its path:

    routes = [
        route("/admin/events", list_events, access=ADMIN),
        route("/predictions/{prediction_id}", get_prediction, access=SUBSCRIBER),
        route("/api/predictions", create_prediction, access=API_KEY, methods=["POST"]),
        socket_route("/events/ws", all_events_stream, access=ADMIN),
    ]

`access` is required, so a route cannot be added without saying who may call it (`PUBLIC` says
"anyone" out loud; `SIGNED` is the webhook, whose endpoint verifies the Standard Webhooks
signature itself, since that needs the body). A refused HTTP call is answered in the error
shape (401 without a token, 403 with a wrong one) and its handler never runs; a refused
WebSocket is closed before the handshake is accepted (an HTTP 403), after the page's origin is
checked. A handler that needs to know who called reads `caller_of(request)`.

A feature with its own rule (a file readable by subscribers of any prediction that holds it, a
batch token) subclasses `Access` with an async `admit`; its `scheme` names it in the API
description. Token parsing and comparison live in `service.core.auth` (pure).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from service.core.auth import matches_any, require_admin, require_api_key, require_reader, token_from
from service.core.errors import RelayError
from service.web.origins import require_origin
from service.web.state import relay_of

# Closing before accept makes uvicorn refuse the handshake with a bare 403. (Its denial-response
# path, which could carry an error body, logs a spurious ERROR per refusal: uvicorn PR #3138.)
POLICY_VIOLATION = 1008


@dataclass(frozen=True)
class Caller:
    """Who passed the route's check: `token` as presented (None for PUBLIC and SIGNED routes)."""

    token: str | None
    admin: bool = False
    prediction: str | None = None  # a subscriber token's `prediction` claim (an id, or `*`)


class Access:
    """A route's access rule; `admit` raises Unauthorized/Forbidden (RelayError) to refuse."""

    scheme = "none"  # how the API description names it

    async def admit(self, connection: HTTPConnection) -> Caller:
        return Caller(token=None)

    def __repr__(self) -> str:
        return f"<access {self.scheme}>"


class Public(Access):
    """Anyone: health probes, metrics, the dashboard's static page."""


class Signed(Access):
    """`POST /webhooks/replicate`: the endpoint checks the Standard Webhooks signature."""

    scheme = "webhook-signature"


class Admin(Access):
    """The admin token (`RELAY_ADMIN_TOKEN`), as Bearer or `?token=`."""

    scheme = "admin"

    async def admit(self, connection: HTTPConnection) -> Caller:
        token = token_from(connection.headers, connection.query_params)
        require_admin(token, relay_of(connection).settings.admin_token)
        return Caller(token=token, admin=True)


class ApiKey(Access):
    """The admin token or a key from `RELAY_API_KEYS` (the caller's key: `caller_of(r).token`)."""

    scheme = "api-key"

    async def admit(self, connection: HTTPConnection) -> Caller:
        settings = relay_of(connection).settings
        key = require_api_key(
            token_from(connection.headers, connection.query_params), settings.admin_token, settings.api_keys
        )
        return Caller(token=key, admin=matches_any(key, [settings.admin_token]))


class Subscriber(Access):
    """The admin token, or a subscriber token for the prediction named by the path parameter
    `param` (or a token for every prediction, `*`)."""

    scheme = "subscriber"

    def __init__(self, param: str = "prediction_id") -> None:
        self.param = param

    async def admit(self, connection: HTTPConnection) -> Caller:
        settings = relay_of(connection).settings
        token = token_from(connection.headers, connection.query_params)
        prediction_id = connection.path_params[self.param]
        require_reader(token, prediction_id, settings.admin_token, settings.subscribe_key)
        assert token is not None  # require_reader refuses a missing token
        return Caller(token=token, admin=matches_any(token, [settings.admin_token]))


PUBLIC: Access = Public()
SIGNED: Access = Signed()
ADMIN: Access = Admin()
API_KEY: Access = ApiKey()
SUBSCRIBER: Access = Subscriber()

HttpHandler = Callable[[Request], Awaitable[Response]]
SocketHandler = Callable[[WebSocket], Awaitable[None]]


class GuardedRoute(Route):
    """A Starlette `Route` that carries its `access` (read by tests and the API description)."""

    access: Access


class GuardedWebSocketRoute(WebSocketRoute):
    access: Access


def caller_of(connection: HTTPConnection) -> Caller:
    """Who the route's access check admitted (set before the handler runs)."""
    caller = connection.scope.get("relay.caller")
    assert isinstance(caller, Caller), "caller_of() used on a route built without relay's route()"
    return caller


def token_of(connection: HTTPConnection) -> str:
    """The token the caller was admitted with, on an ADMIN, API_KEY or SUBSCRIBER route."""
    token = caller_of(connection).token
    assert token is not None, "token_of() used on a route that admits callers without a token"
    return token


def guard(handler: HttpHandler, access: Access) -> HttpHandler:
    async def guarded(request: Request) -> Response:
        request.scope["relay.caller"] = await access.admit(request)
        return await handler(request)

    guarded.__name__ = handler.__name__
    guarded.__doc__ = handler.__doc__
    return guarded


def route(
    path: str,
    endpoint: Any,
    *,
    access: Access,
    methods: Sequence[str] | None = None,
    name: str | None = None,
) -> GuardedRoute:
    """An HTTP route whose `access` is checked before `endpoint` runs.

    A bare ASGI endpoint (a class instance, such as the webhook's) cannot be wrapped: it is only
    allowed with SIGNED or PUBLIC, whose checks are its own.
    """
    if not (inspect.isfunction(endpoint) or inspect.ismethod(endpoint)):
        if access not in (SIGNED, PUBLIC):
            raise TypeError(f"{path}: an ASGI endpoint checks its own access; declare SIGNED or PUBLIC")
        built = GuardedRoute(path, endpoint, methods=list(methods) if methods else None, name=name)
    else:
        built = GuardedRoute(
            path, guard(endpoint, access), methods=list(methods) if methods else None, name=name
        )
    built.access = access
    return built


def socket_route(
    path: str, endpoint: SocketHandler, *, access: Access, name: str | None = None
) -> GuardedWebSocketRoute:
    """A WebSocket route: the page's origin, then `access`, before the handshake is accepted."""

    async def guarded(websocket: WebSocket) -> None:
        settings = relay_of(websocket).settings
        try:
            require_origin(
                websocket.headers.get("origin"), websocket.url, settings.allowed_origins, settings.public_url
            )
            websocket.scope["relay.caller"] = await access.admit(websocket)
        except RelayError:
            await websocket.close(POLICY_VIOLATION)
            return
        await endpoint(websocket)

    guarded.__name__ = endpoint.__name__
    built = GuardedWebSocketRoute(path, guarded, name=name)
    built.access = access
    return built
