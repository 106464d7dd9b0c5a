"""Reading the log over HTTP: a prediction's state and its events, behind a token."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from service.archive.files import archive_entries
from service.core.errors import NotFound
from service.core.openapi import (
    ADMIN,
    SEQ,
    SUBSCRIBER,
    TOKEN_QUERY,
    errors,
    json_body,
    operation,
    path_param,
    query_param,
    ref,
)
from service.core.params import MAX_PAGE, check_text, parse_int
from service.db import store
from service.db.connection import Connection
from service.db.events import prediction_state
from service.web import auth
from service.web.auth import route
from service.web.responses import EventsResponse, events_page
from service.web.state import relay_of

MAX_ID = 256  # as ingest allows (service.ingest.committer.MAX_LENGTHS)


def int_param(request: Request, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    return parse_int(name, request.query_params.get(name), default, minimum, maximum)


def path_id(request: Request, name: str = "prediction_id") -> str:
    """A path's id, refused (400) when no stored id could match it (NUL, too long)."""
    return check_text(name, request.path_params[name], MAX_ID)


async def get_prediction(request: Request) -> EventsResponse:
    prediction_id = path_id(request)
    relay = relay_of(request)
    async with relay.pool.acquire() as conn:
        row = await store.fetch_prediction(conn, prediction_id)
        if row is None:
            raise NotFound(f"no events stored for prediction {prediction_id!r}")
        state = prediction_state(row, relay.vault)
        state["archive"] = await archive_list(conn, request, state)
    return EventsResponse(state)


async def archive_list(conn: Connection, request: Request, prediction: Any) -> list[dict[str, Any]]:
    """The `archive` of a prediction (empty when the archive is off)."""
    relay = relay_of(request)
    if relay.archive_store is None:
        return []
    return await archive_entries(conn, prediction, relay.archive_policy)


async def list_prediction_events(request: Request) -> Response:
    prediction_id = path_id(request)
    after = int_param(request, "after", 0)
    limit = int_param(request, "limit", 100, minimum=1, maximum=MAX_PAGE)
    relay = relay_of(request)
    async with relay.pool.acquire() as conn:
        rows = await store.fetch_events(conn, prediction_id=prediction_id, after=after, limit=limit)
    return events_page(rows, relay.vault, after)


routes = [
    route("/predictions/{prediction_id}", get_prediction, access=auth.SUBSCRIBER),
    route("/predictions/{prediction_id}/events", list_prediction_events, access=auth.SUBSCRIBER),
]

PREDICTION_ID = path_param("prediction_id", "the Replicate prediction id")
READERS = (SUBSCRIBER, ADMIN)
openapi = {
    "/predictions/{prediction_id}": {
        "get": operation(
            "A prediction's current state",
            tag="reading",
            security=READERS,
            parameters=[PREDICTION_ID, TOKEN_QUERY],
            responses={200: json_body(ref("PredictionState")), **errors(400, 401, 403, 404)},
        )
    },
    "/predictions/{prediction_id}/events": {
        "get": operation(
            "A prediction's stored events, in seq order",
            tag="reading",
            security=READERS,
            parameters=[
                PREDICTION_ID,
                query_param("after", SEQ, "only events with a larger seq (a page's next_after)"),
                query_param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}, "page size"),
                TOKEN_QUERY,
            ],
            responses={200: json_body(ref("EventsPage")), **errors(400, 401, 403)},
        )
    },
}
