"""`/admin/destinations`: add, list, pause, resume, retry and remove destinations (admin token)."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.core.errors import InvalidRequest
from service.core.openapi import ADMIN, SEQ, TOKEN_QUERY, errors, json_body, operation, path_param
from service.core.settings import WHSEC_PATTERN
from service.destinations import model
from service.net.guard import require_public
from service.web import auth
from service.web.auth import route
from service.web.routes.admin import FILTER_SCHEMAS, HTTP_URL_PATTERN
from service.web.state import relay_of


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw) if raw.strip() else None
    except (ValueError, RecursionError):  # nested too deeply for the parser: invalid like the rest
        raise InvalidRequest('the body must be JSON: {"url": "https://…"}') from None


async def add_destination(request: Request) -> JSONResponse:
    """`POST /admin/destinations` → 201 with the secret, shown only here."""
    new = model.parse_new(await _json_body(request))
    relay = relay_of(request)
    if not relay.settings.replay_private:
        await require_public(new.url, "the destination")
    async with relay.pool.acquire() as conn:
        created = await model.create(conn, new, relay.vault)
    return JSONResponse(created, status_code=201)


async def list_destinations(request: Request) -> JSONResponse:
    async with relay_of(request).pool.acquire() as conn:
        found = await model.listing(conn)
    return JSONResponse({"destinations": found})


async def one_destination(request: Request) -> Response:
    """`GET` one destination, or `DELETE` it (its owed events go with it)."""
    destination_id = request.path_params["id"]
    async with relay_of(request).pool.acquire() as conn:
        if request.method == "DELETE":
            await model.remove(conn, destination_id)
            return Response(status_code=204)
        return JSONResponse(await model.one(conn, destination_id))


async def act(request: Request, action: str) -> JSONResponse:
    """`POST /admin/destinations/{id}/pause|resume|retry` → the destination as listed."""
    destination_id = request.path_params["id"]
    async with relay_of(request).pool.acquire() as conn:
        if action == "retry":
            requeued = await model.retry(conn, destination_id)
            return JSONResponse({**await model.one(conn, destination_id), "requeued": requeued})
        return JSONResponse(await model.set_paused(conn, destination_id, action == "pause"))


async def pause(request: Request) -> JSONResponse:
    return await act(request, "pause")


async def resume(request: Request) -> JSONResponse:
    return await act(request, "resume")


async def retry(request: Request) -> JSONResponse:
    """Re-queue the exhausted events; `requeued` says how many."""
    return await act(request, "retry")


async def add_or_list(request: Request) -> Response:
    return await (add_destination(request) if request.method == "POST" else list_destinations(request))


ID = path_param("id", "the destination id")
DESTINATION: dict[str, Any] = {"type": "object", "required": ["id", "url"], "properties": {
    "id": {"type": "string"}, "url": {"type": "string"}, "cursor": {"type": "integer"}}}  # fmt: skip
FILTERS: dict[str, Any] = {name: FILTER_SCHEMAS[name] for name in model.FILTERS}
NEW = {
    "type": "object",
    "required": ["url"],
    "additionalProperties": False,
    "properties": {
        "url": {"type": "string", "pattern": HTTP_URL_PATTERN, "maxLength": model.MAX_URL},
        "secret": {"type": "string", "pattern": WHSEC_PATTERN},
        "filter": {"type": "object", "additionalProperties": False, "properties": FILTERS},
        "from": {"anyOf": [{"enum": ["now", "start"]}, SEQ]},
    },
}
LIST = {"type": "object", "required": ["destinations"], "properties": {
    "destinations": {"type": "array", "items": DESTINATION}}}  # fmt: skip


def _action(summary: str) -> dict[str, Any]:
    return {
        "post": operation(
            summary,
            tag="destinations",
            security=[ADMIN],
            parameters=[ID, TOKEN_QUERY],
            responses={200: json_body(DESTINATION), **errors(400, 401, 403, 404)},
        )
    }


openapi = {
    "/admin/destinations": {
        "post": operation(
            "Add a destination (its secret is shown only in this answer)",
            tag="destinations",
            security=[ADMIN],
            parameters=[TOKEN_QUERY],
            body=NEW,
            responses={201: json_body(DESTINATION, "Added"), **errors(400, 401, 403)},
        ),
        "get": operation(
            "Every destination with its cursor, lag and state",
            tag="destinations",
            security=[ADMIN],
            parameters=[TOKEN_QUERY],
            responses={200: json_body(LIST), **errors(401, 403)},
        ),
    },
    "/admin/destinations/{id}": {
        "get": operation(
            "One destination",
            tag="destinations",
            security=[ADMIN],
            parameters=[ID, TOKEN_QUERY],
            responses={200: json_body(DESTINATION), **errors(400, 401, 403, 404)},
        ),
        "delete": operation(
            "Remove a destination and what it still owes",
            tag="destinations",
            security=[ADMIN],
            parameters=[ID, TOKEN_QUERY],
            responses={204: {"description": "Removed"}, **errors(400, 401, 403, 404)},
        ),
    },
    "/admin/destinations/{id}/pause": _action("Pause a destination"),
    "/admin/destinations/{id}/resume": _action("Resume a destination"),
    "/admin/destinations/{id}/retry": _action("Send its exhausted events again"),
}

routes = [
    route("/admin/destinations", add_or_list, access=auth.ADMIN, methods=["GET", "POST"]),
    route("/admin/destinations/{id}", one_destination, access=auth.ADMIN, methods=["GET", "DELETE"]),
    route("/admin/destinations/{id}/pause", pause, access=auth.ADMIN, methods=["POST"]),
    route("/admin/destinations/{id}/resume", resume, access=auth.ADMIN, methods=["POST"]),
    route("/admin/destinations/{id}/retry", retry, access=auth.ADMIN, methods=["POST"]),
]
