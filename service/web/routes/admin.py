"""The admin API: search the log and replay it, behind the admin token."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.core.errors import DatabaseUnavailable, InvalidRequest, NotFound
from service.core.filters import MAX_TEXT, SOURCES, EventFilter, parse_filter
from service.core.openapi import (
    ADMIN,
    SEQ,
    TOKEN_QUERY,
    errors,
    json_body,
    operation,
    path_param,
    query_param,
    ref,
)
from service.core.params import MAX_PAGE
from service.core.settings import WHSEC_PATTERN
from service.db import store
from service.ops.replay import Report, Target, UrlTarget, check_target_address, replay, target_from_json
from service.web import auth
from service.web.auth import route
from service.web.responses import events_page
from service.web.routes.reading import int_param
from service.web.routes.webhooks import read_body
from service.web.state import relay_of


async def list_events(request: Request) -> Response:
    """`GET /admin/events?<filters>&limit=` → `{"events": [...], "next_after": SEQ}`."""
    event_filter = parse_filter(dict(request.query_params), extra=("limit", "token"))
    limit = int_param(request, "limit", 100, minimum=1, maximum=MAX_PAGE)
    where, args = event_filter.where()
    relay = relay_of(request)
    async with relay.read_pool.acquire() as conn:
        rows = await store.fetch_where(conn, where, args, limit)
    return events_page(rows, relay.vault, event_filter.after)


REPLAY_MAX_BODY = 65536  # a filter and a target: a few hundred bytes in practice
DEFAULT_REPLAY_WAIT = 5  # well under the 10 s read timeout many HTTP clients default to


def replay_request(body: bytes) -> tuple[EventFilter, Target, bool]:
    """`{"filter", "target", "dry_run"}` from the body; 400 naming what is wrong. A body nested
    too deeply for the parser is a 400 like any other invalid JSON, never a 500."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidRequest('the body must be JSON: {"filter": {...}, "target": {...}}') from None
    if not isinstance(payload, dict):
        raise InvalidRequest("the body must be a JSON object")
    unknown = sorted(set(payload) - {"filter", "target", "dry_run"})
    if unknown:
        raise InvalidRequest(f"unknown field {str(unknown[0])[:40]!r}; expected filter, target, dry_run")
    filter_values = payload.get("filter") or {}
    if not isinstance(filter_values, dict):
        raise InvalidRequest("filter must be an object of filters")
    event_filter = parse_filter(filter_values)
    target = target_from_json(payload.get("target"))
    dry_run = payload.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise InvalidRequest("dry_run must be true or false")
    return event_filter, target, dry_run


async def post_replay(request: Request) -> JSONResponse:
    """`POST /admin/replay[?wait=S]` with `{"filter", "target", "dry_run"}`.

    The replay runs as a background job. Done within `wait` seconds (default 5, 0-60): 200 with
    the report (DESIGN's answer). Still running: 202 with `{"job", "status", "url", "report"}`
    (the report so far) and `Location: /admin/replay/{job}`, to poll.
    """
    relay = relay_of(request)
    wait = int_param(request, "wait", DEFAULT_REPLAY_WAIT, minimum=0, maximum=60)
    event_filter, target, dry_run = replay_request(
        await read_body(request, REPLAY_MAX_BODY, "the replay body limit")
    )
    if isinstance(target, UrlTarget):
        await check_target_address(target, relay.settings.replay_private)

    async def run(report: Report) -> None:
        async with relay.pool.acquire() as conn:
            await replay(
                conn, event_filter, target, relay.vault,
                dry_run=dry_run, report=report, public=not relay.settings.replay_private,
            )  # fmt: skip

    job = await relay.replays.start(run)
    assert job.task is not None
    await asyncio.wait({job.task}, timeout=wait)
    if not job.task.done():
        await relay.replays.checkpoint(job)  # every instance now answers with this report
        url = f"/admin/replay/{job.id}"
        body = {"job": job.id, "status": job.status, "url": url, "report": job.report.as_json()}
        return JSONResponse(body, status_code=202, headers={"Location": url})
    if job.status == "done":
        return JSONResponse({**job.report.as_json(), "job": job.id})
    # The replay failed before it was done: the same answer as the synchronous call gave.
    raise DatabaseUnavailable("the replay could not read the log; retry later")


def found_job(job: dict[str, Any] | None) -> JSONResponse:
    if job is None:
        raise NotFound("no replay job with this id")
    return JSONResponse(job)


async def get_replay_job(request: Request) -> JSONResponse:
    """`GET /admin/replay/{job}` → `{"id", "status": running|done|failed|canceled, "error",
    "started_at", "finished_at", "report"}`, from any instance."""
    return found_job(await relay_of(request).replays.read(request.path_params["job_id"]))


async def cancel_replay_job(request: Request) -> JSONResponse:
    """`POST /admin/replay/{job}/cancel`: stop a running replay (what was sent stays sent)."""
    return found_job(await relay_of(request).replays.cancel(request.path_params["job_id"]))


routes = [
    route("/admin/events", list_events, access=auth.ADMIN),
    route("/admin/replay", post_replay, access=auth.ADMIN, methods=["POST"]),
    route("/admin/replay/{job_id}", get_replay_job, access=auth.ADMIN),
    route("/admin/replay/{job_id}/cancel", cancel_replay_job, access=auth.ADMIN, methods=["POST"]),
]

HTTP_URL_PATTERN = "^https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/\\S*)?$"
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
                        "url": {"type": "string", "pattern": HTTP_URL_PATTERN},
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
REPLAY_JOB = {"type": "object", "properties": {"job": {"type": "string"}, "status": {"type": "string"}}}
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
            parameters=[query_param("wait", {"type": "integer", "minimum": 0, "maximum": 60}, "seconds")],
            body=REPLAY_BODY,
            responses={
                200: json_body(REPLAY_REPORT, "The report, once done"),
                202: json_body(REPLAY_JOB, "Still running: poll Location"),
                **errors(400, 401, 403, 413, 429),
            },
        )
    },
    "/admin/replay/{job_id}": {
        "get": operation(
            "A replay job and its report so far",
            tag="admin",
            security=[ADMIN],
            parameters=[path_param("job_id"), TOKEN_QUERY],
            responses={200: json_body(REPLAY_JOB), **errors(401, 403, 404)},
        )
    },
    "/admin/replay/{job_id}/cancel": {
        "post": operation(
            "Cancel a replay job",
            tag="admin",
            security=[ADMIN],
            parameters=[path_param("job_id"), TOKEN_QUERY],
            responses={200: json_body(REPLAY_JOB), **errors(401, 403, 404)},
        )
    },
}
