"""`/admin/destinations`: add, list, pause, resume, retry and remove destinations (admin token)."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.core.errors import InvalidRequest
from service.destinations import model
from service.web.routes.admin import authorize_admin
from service.web.state import relay_of


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        raise InvalidRequest('the body must be JSON: {"url": "https://…"}') from None


async def add_destination(request: Request) -> JSONResponse:
    """`POST /admin/destinations` → 201 with the secret, shown only here."""
    authorize_admin(request)
    new = model.parse_new(await _json_body(request))
    relay = relay_of(request)
    async with relay.pool.acquire() as conn:
        created = await model.create(conn, new, relay.vault)
    return JSONResponse(created, status_code=201)


async def list_destinations(request: Request) -> JSONResponse:
    authorize_admin(request)
    async with relay_of(request).pool.acquire() as conn:
        found = await model.listing(conn)
    return JSONResponse({"destinations": found})


async def one_destination(request: Request) -> Response:
    """`GET` one destination, or `DELETE` it (its owed events go with it)."""
    authorize_admin(request)
    destination_id = request.path_params["id"]
    async with relay_of(request).pool.acquire() as conn:
        if request.method == "DELETE":
            await model.remove(conn, destination_id)
            return Response(status_code=204)
        return JSONResponse(await model.one(conn, destination_id))


async def act(request: Request, action: str) -> JSONResponse:
    """`POST /admin/destinations/{id}/pause|resume|retry` → the destination as listed."""
    authorize_admin(request)
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


routes = [
    Route("/admin/destinations", add_or_list, methods=["GET", "POST"]),
    Route("/admin/destinations/{id}", one_destination, methods=["GET", "DELETE"]),
    Route("/admin/destinations/{id}/pause", pause, methods=["POST"]),
    Route("/admin/destinations/{id}/resume", resume, methods=["POST"]),
    Route("/admin/destinations/{id}/retry", retry, methods=["POST"]),
]
