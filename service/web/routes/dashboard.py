"""The live dashboard (`GET /`, `GET /p/{id}`), the browser client `relay.js`, and the one
admin read the dashboard needs on load: recent predictions with their status timelines.

The pages are static files in `service/web/static/`; everything live comes from the existing
WebSocket streams, through `relay.js`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from service.core.openapi import ADMIN, TOKEN_QUERY, errors, json_body, operation, path_param, query_param
from service.db import store
from service.db.events import prediction_state
from service.web import auth
from service.web.auth import route
from service.web.responses import EventsResponse
from service.web.routes.reading import archive_list, int_param
from service.web.state import relay_of

STATIC = Path(__file__).parent.parent / "static"
DEFAULT_RECENT = 50
MAX_RECENT = 500

# Pages and scripts come only from this origin (no CDN); output images may live anywhere.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' https: http: data:;"
        " connect-src 'self' ws: wss:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
NO_CACHE = {"Cache-Control": "no-cache"}


async def dashboard_page(request: Request) -> FileResponse:
    """The one page: the list at `/`, one prediction at `/p/{id}` (the script reads the path)."""
    return FileResponse(STATIC / "index.html", headers={**PAGE_HEADERS, **NO_CACHE})


async def relay_js(request: Request) -> FileResponse:
    """The browser client, at a stable URL; revalidated on each load so fixes reach pages."""
    return FileResponse(STATIC / "relay.js", media_type="text/javascript", headers=NO_CACHE)


def timeline_entry(run: asyncpg.Record) -> dict[str, Any]:
    return {
        "status": run["status"],
        "seq": run["seq"],
        "events": run["events"],
        "received_at": store.iso(run["received_at"]),
    }


async def recent_predictions(request: Request) -> EventsResponse:
    """`GET /admin/predictions?limit=N`: the most recently updated predictions, each with its
    status timeline, and `seq`, the log position of that snapshot: streaming
    `/events/ws?after=seq` from there misses nothing and repeats nothing."""
    relay = relay_of(request)
    limit = int_param(request, "limit", DEFAULT_RECENT, minimum=1, maximum=MAX_RECENT)
    async with relay.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        seq = await store.max_seq(conn)
        rows = await store.fetch_recent_predictions(conn, limit)
        runs = await store.fetch_status_runs(conn, [row["prediction_id"] for row in rows])
    timelines = defaultdict(list)
    for run in runs:
        timelines[run["prediction_id"]].append(timeline_entry(run))
    predictions = [
        {
            **prediction_state(row, relay.vault),
            "model": row["model"],
            "timeline": timelines[row["prediction_id"]],
        }
        for row in rows
    ]
    async with relay.pool.acquire() as conn:
        for prediction in predictions:
            prediction["archive"] = await archive_list(conn, request, prediction)
    return EventsResponse({"predictions": predictions, "seq": seq})


routes = [
    route("/", dashboard_page, access=auth.PUBLIC),
    route("/p/{prediction_id}", dashboard_page, access=auth.PUBLIC),
    route("/relay.js", relay_js, access=auth.PUBLIC),
    route("/admin/predictions", recent_predictions, access=auth.ADMIN),
    Mount("/static", StaticFiles(directory=STATIC), name="static"),  # public: the page's assets
]


def _file(media_type: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


PAGE = operation("The live dashboard", tag="dashboard", responses={200: _file("text/html", "The page")})
RECENT = {
    "type": "object",
    "required": ["predictions", "seq"],
    "properties": {"predictions": {"type": "array", "items": {"type": "object"}}, "seq": {"type": "integer"}},
}
openapi = {
    "/": {"get": PAGE},
    "/p/{prediction_id}": {"get": {**PAGE, "parameters": [path_param("prediction_id")]}},
    "/relay.js": {
        "get": operation(
            "The browser client", tag="dashboard", responses={200: _file("text/javascript", "The script")}
        )
    },
    "/static/{path}": {
        "get": operation(
            "The dashboard's static files",
            tag="dashboard",
            parameters=[path_param("path")],
            responses={200: _file("application/octet-stream", "The file"), **errors(404)},
        )
    },
    "/admin/predictions": {
        "get": operation(
            "Recent predictions with their status timelines (the dashboard's first load)",
            tag="admin",
            security=[ADMIN],
            parameters=[
                query_param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_RECENT}),
                TOKEN_QUERY,
            ],
            responses={200: json_body(RECENT), **errors(400, 401, 403)},
        )
    },
}
