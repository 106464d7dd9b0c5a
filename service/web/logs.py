"""Relay's logging: text or JSON lines (RELAY_LOG_FORMAT), context fields, the access log.

Everything goes through the standard `logging` module to one stderr handler. In JSON mode each
record is one object (`time`, `level`, `logger`, `message`, plus the context fields bound for the
request, socket or job: service.core.logcontext). uvicorn's access log is on, its query strings
with `token=` values redacted, since subscriber tokens travel there.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.logcontext import ContextFilter, bind, request_id_from

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TOKEN_VALUE = re.compile(r"(?i)((?:^|[?&;])(?:token|access_token)=)[^&;#]*")
REQUEST_ID_HEADER = "x-request-id"


def redact_tokens(path: str) -> str:
    """`/x?token=abc&after=3` -> `/x?token=[redacted]&after=3`."""
    if "?" not in path:
        return path  # no query string, no token: most lines skip the regex
    return TOKEN_VALUE.sub(r"\1[redacted]", path)


class AccessLogFilter(logging.Filter):
    """uvicorn's access record, with token values redacted and its parts as fields of their own."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:
            client, method, path, version, status = args
            path = redact_tokens(str(path))
            record.args = (client, method, path, version, status)
            record.http_method, record.path, record.status = method, path, status
        return True


class RelayJsonFormatter(JsonFormatter):
    """One object a line: `time` (UTC, ISO 8601), `level`, `logger`, `message`, then the fields."""

    def add_fields(
        self, log_record: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_record["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        log_record["level"] = record.levelname
        log_record["logger"] = record.name
        super().add_fields(log_record, record, message_dict)
        log_record.pop("color_message", None)  # uvicorn's duplicate of the message, with ANSI codes
        log_record.pop("taskName", None)


class WithoutTraceback(logging.Filter):
    """Turns a logged traceback into the exception's name: while the database is down asyncpg's
    pool logs one for every failed reconnect, which buries the one line that matters."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.msg} ({type(record.exc_info[1]).__name__})"
            record.exc_info = None
        return True


def configure_logging(level: str, log_format: str = "text", access_log: bool = True) -> None:
    """RELAY_LOG_LEVEL applies to Relay's own loggers only: libraries stay at WARNING, since at
    DEBUG some (websockets, asyncpg) print the frames and queries that carry users' data."""
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (
        RelayJsonFormatter("%(message)s", json_ensure_ascii=False)
        if log_format == "json"
        else logging.Formatter(TEXT_FORMAT)
    )
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("relay").setLevel(level)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    access = logging.getLogger("uvicorn.access")
    access.setLevel(logging.INFO if access_log else logging.WARNING)
    access.handlers, access.propagate = [], True
    if not any(isinstance(f, AccessLogFilter) for f in access.filters):
        access.addFilter(AccessLogFilter())
    pool = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, WithoutTraceback) for f in pool.filters):
        pool.addFilter(WithoutTraceback())


class RequestContext:
    """Binds `request_id` (the caller's X-Request-ID, or a new one) and echoes it on the answer.

    Not reset at the end: uvicorn runs each request in its own task, and the error and access
    lines written after the handler returns must still carry it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(header_value(scope, REQUEST_ID_HEADER.encode()))
        bind(request_id=request_id)
        echoed = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), echoed]}
            await send(message)

        await self.app(scope, receive, send_with_id if scope["type"] == "http" else send)


def header_value(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1")
    return None
