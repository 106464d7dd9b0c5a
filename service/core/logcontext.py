"""Context fields for log lines: bound once per request, socket or job, added to every record.

A request's task (uvicorn runs each request and each socket in its own asyncio task, which starts
from a copy of the context) binds `request_id`; the webhook endpoint adds `webhook_id`,
`prediction_id` and `seq` as it learns them; a background job binds what it works on (a
prediction, a batch, a destination). `ContextFilter`, on the log handler, copies the bound
fields onto each record, so even lines written by libraries (uvicorn's access log) carry them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

FIELDS = ("request_id", "webhook_id", "prediction_id", "seq", "batch_id", "destination_id")
_BOUND: dict[str, ContextVar[Any]] = {name: ContextVar(f"relay_log_{name}", default=None) for name in FIELDS}

# An incoming X-Request-ID is kept when it is a plain token (no spaces, quotes or newlines that
# could forge a log line), else Relay makes its own.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
MAX_ID = 128


def bind(**fields: Any) -> None:
    """Bind fields for the rest of the current task (and the tasks it starts)."""
    for name, value in fields.items():
        _BOUND[name].set(value)


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Bind fields for the duration of a block (a job's unit of work), then restore them."""
    tokens = [(_BOUND[name], _BOUND[name].set(value)) for name, value in fields.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current() -> dict[str, Any]:
    return {name: value for name, var in _BOUND.items() if (value := var.get()) is not None}


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-ID when it is a plain token, else a new random one."""
    if header and REQUEST_ID.match(header):
        return header
    return uuid.uuid4().hex


def printable_id(value: str | None) -> str | None:
    """An id from an unverified header, bounded, for a log field (the JSON encoder escapes it)."""
    return None if value is None else value[:MAX_ID]


class ContextFilter(logging.Filter):
    """Adds the bound fields to every record passing the handler (a field set by `extra` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__  # one lookup per field: this runs for every line written
        for name, var in _BOUND.items():
            value = var.get()
            if value is not None and name not in fields:
                fields[name] = value
        return True
