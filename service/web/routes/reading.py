"""Reading the log over HTTP: a prediction's state and its events, behind a token."""

from __future__ import annotations

from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.archive.files import archive_entries
from service.core.auth import require_reader, token_from
from service.core.errors import InvalidRequest, NotFound
from service.db import store
from service.db.events import EventsResponse, events_page, prediction_state

MAX_PAGE = 1000


def parse_int(name: str, raw: str | None, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    """A bounded non-negative integer from text; InvalidRequest naming `name` otherwise."""
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit():
        raise InvalidRequest(f"{name} must be a non-negative integer, got {raw[:40]!r}")
    value = int(raw)
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise InvalidRequest(f"{name} must be {bounds}, got {value}")
    return value


def int_param(request: Request, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    return parse_int(name, request.query_params.get(name), default, minimum, maximum)


def authorize(request: Request, prediction_id: str | None) -> None:
    settings = request.app.state.relay.settings
    token = token_from(request.headers, request.query_params)
    require_reader(token, prediction_id, settings.admin_token, settings.subscribe_key)


async def get_prediction(request: Request) -> EventsResponse:
    prediction_id = request.path_params["prediction_id"]
    authorize(request, prediction_id)
    relay = request.app.state.relay
    async with relay.pool.acquire() as conn:
        row = await store.fetch_prediction(conn, prediction_id)
        if row is None:
            raise NotFound(f"no events stored for prediction {prediction_id!r}")
        state = prediction_state(row, relay.vault)
        state["archive"] = await archive_list(conn, request, state)
    return EventsResponse(state)


async def archive_list(conn: asyncpg.Connection, request: Request, prediction: Any) -> list[dict[str, Any]]:
    """The `archive` of a prediction (empty when the archive is off)."""
    relay = request.app.state.relay
    if relay.archive_store is None:
        return []
    return await archive_entries(conn, prediction, relay.archive_policy)


async def list_prediction_events(request: Request) -> Response:
    prediction_id = request.path_params["prediction_id"]
    authorize(request, prediction_id)
    after = int_param(request, "after", 0)
    limit = int_param(request, "limit", 100, minimum=1, maximum=MAX_PAGE)
    relay = request.app.state.relay
    async with relay.pool.acquire() as conn:
        rows = await store.fetch_events(conn, prediction_id=prediction_id, after=after, limit=limit)
    return events_page(rows, relay.vault, after)


routes = [
    Route("/predictions/{prediction_id}", get_prediction),
    Route("/predictions/{prediction_id}/events", list_prediction_events),
]
