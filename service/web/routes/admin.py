"""The admin API: search the log and replay it, behind the admin token."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.core.auth import require_admin, token_from
from service.core.errors import InvalidRequest
from service.core.filters import MAX_TEXT, SOURCES, parse_filter
from service.core.openapi import ADMIN, SEQ, TOKEN_QUERY, errors, json_body, operation, query_param, ref
from service.core.params import MAX_PAGE
from service.core.settings import WHSEC_PATTERN
from service.db import store
from service.ops.replay import replay, target_from_json
from service.web.responses import events_page
from service.web.routes.reading import int_param
from service.web.state import relay_of


def authorize_admin(request: Request) -> None:
    token = token_from(request.headers, request.query_params)
    require_admin(token, relay_of(request).settings.admin_token)


async def list_events(request: Request) -> Response:
    """`GET /admin/events?<filters>&limit=` → `{"events": [...], "next_after": SEQ}`."""
    authorize_admin(request)
    event_filter = parse_filter(dict(request.query_params), extra=("limit", "token"))
    limit = int_param(request, "limit", 100, minimum=1, maximum=MAX_PAGE)
    where, args = event_filter.where()
    relay = relay_of(request)
    async with relay.read_pool.acquire() as conn:
        rows = await store.fetch_where(conn, where, args, limit)
    return events_page(rows, relay.vault, event_filter.after)


async def post_replay(request: Request) -> JSONResponse:
    """`POST /admin/replay` with `{"filter", "target", "dry_run"}` → the report, once done."""
    authorize_admin(request)
    try:
        payload = json.loads(await request.body())
    except ValueError:
        raise InvalidRequest('the body must be JSON: {"filter": {...}, "target": {...}}') from None
    if not isinstance(payload, dict):
        raise InvalidRequest("the body must be a JSON object")
    unknown = sorted(set(payload) - {"filter", "target", "dry_run"})
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}; expected filter, target, dry_run")
    filter_values = payload.get("filter") or {}
    if not isinstance(filter_values, dict):
        raise InvalidRequest("filter must be an object of filters")
    event_filter = parse_filter(filter_values)
    target = target_from_json(payload.get("target"))
    dry_run = payload.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise InvalidRequest("dry_run must be true or false")
    async with relay_of(request).pool.acquire() as conn:
        report = await replay(conn, event_filter, target, relay_of(request).vault, dry_run=dry_run)
    return JSONResponse(report.as_json())


routes = [
    Route("/admin/events", list_events),
    Route("/admin/replay", post_replay, methods=["POST"]),
]

MOMENT: dict[str, Any] = {"type": "string", "format": "date-time", "description": "ISO 8601 on received_at"}
TEXT: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT, "pattern": "^[^\\x00]*$"}
FILTER_SCHEMAS: dict[str, dict[str, Any]] = {
    "prediction_id": TEXT,
    "status": TEXT,
    "source": {"enum": list(SOURCES)},
    "since": MOMENT,
    "until": MOMENT,
    "after": SEQ,
    "before": SEQ,
}
FILTER = {"type": "object", "additionalProperties": False, "properties": FILTER_SCHEMAS}
REPLAY_BODY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["target"],
    "properties": {
        "filter": FILTER,
        "target": {
            "oneOf": [
                {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["url", "secret"],
                    "properties": {
                        "url": {
                            "type": "string",
                            "pattern": "^https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/\\S*)?$",
                        },
                        "secret": {"type": "string", "pattern": WHSEC_PATTERN},
                    },
                },
                {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["fanout"],
                    "properties": {"fanout": {"const": True}},
                },
            ]
        },
        "dry_run": {"type": "boolean"},
    },
}
REPLAY_REPORT = {
    "type": "object",
    "required": ["matched"],
    "properties": {
        "matched": {"type": "integer"},
        "delivered": {"type": "integer"},
        "failed": {"type": "array", "items": {"type": "object"}},
        "first_seq": {"type": ["integer", "null"]},
        "last_seq": {"type": ["integer", "null"]},
        "dry_run": {"type": "boolean"},
    },
}
openapi = {
    "/admin/events": {
        "get": operation(
            "Search the log",
            tag="admin",
            security=[ADMIN],
            parameters=[
                *(query_param(name, schema) for name, schema in FILTER_SCHEMAS.items()),
                query_param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}),
                TOKEN_QUERY,
            ],
            responses={200: json_body(ref("EventsPage")), **errors(400, 401, 403)},
        )
    },
    "/admin/replay": {
        "post": operation(
            "Replay matching events to a URL or to live subscribers",
            tag="admin",
            security=[ADMIN],
            body=REPLAY_BODY,
            responses={200: json_body(REPLAY_REPORT, "The report, once done"), **errors(400, 401, 403)},
        )
    },
}
