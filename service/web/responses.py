"""Relay's JSON answers: the error shape and event pages that keep delivered text exact."""

from __future__ import annotations

from typing import Any

import asyncpg
from starlette.responses import JSONResponse, Response

from service.core.errors import RelayError
from service.db.events import dumps, page_text
from service.db.vault import Vault


def error_response(error: RelayError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def events_page(rows: list[asyncpg.Record], vault: Vault, after: int) -> Response:
    return Response(page_text(rows, vault, after).encode(), media_type="application/json")


class EventsResponse(JSONResponse):
    """JSON with non-ASCII escaped: a delivered string may hold a lone surrogate (a valid JSON
    escape that UTF-8 cannot encode), which Starlette's JSONResponse would turn into a 500."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode()
