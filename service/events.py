"""The one shape an event has for readers: HTTP pages, WebSocket messages, replays."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from starlette.responses import JSONResponse

from .store import iso


def open_body(row: asyncpg.Record | dict) -> Any:
    """The delivered prediction object of a stored row."""
    return json.loads(row["body"])


def event_message(row: asyncpg.Record | dict, *, replayed: bool = False) -> dict[str, Any]:
    return {
        "type": "event",
        "seq": row["seq"],
        "prediction_id": row["prediction_id"],
        "status": row["status"],
        "webhook_id": row["webhook_id"],
        "source": row["source"],
        "received_at": iso(row["received_at"]),
        "replayed": replayed,
        "prediction": open_body(row),
    }


def dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


class EventsResponse(JSONResponse):
    """JSON with non-ASCII escaped: a delivered string may hold a lone surrogate (a valid JSON
    escape that UTF-8 cannot encode), which Starlette's JSONResponse would turn into a 500."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode()


PREDICTION_FIELDS = ("output", "error", "logs", "metrics", "created_at", "started_at", "completed_at")


def prediction_state(row: asyncpg.Record) -> dict[str, Any]:
    """`GET /predictions/{id}`: the projection plus the latest fields of the state event."""
    body = open_body(row)
    state = {
        "id": row["prediction_id"],
        "status": row["status"],
        "last_seq": row["last_seq"],
        "event_count": row["event_count"],
    }
    state.update({name: body.get(name) if isinstance(body, dict) else None for name in PREDICTION_FIELDS})
    return state
