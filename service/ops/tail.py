"""`relay tail`: a live stream in a terminal, over the same WebSocket API the browsers use.

It reconnects after a drop and resumes with `after=` the last seq it printed, so nothing is
missed or printed twice; replayed messages are shown but never move that cursor. A prediction's
stream ends after its terminal event (close code 1000), and so does the command.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import connect

from service.core.errors import ConfigError

RECONNECT_DELAY = 1.0
POLICY_VIOLATION = 1008
SUMMARY_WIDTH = 60


def ws_base(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise ConfigError(f"--url must be Relay's http(s):// base URL, got {url[:60]!r}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit(parts._replace(scheme=scheme, path=parts.path.rstrip("/"), query="", fragment=""))


def summary(prediction: Any) -> str:
    """A short line about the delivered object: the error, outputs and the last log line.
    Output URLs and inputs are left out; they can be personal."""
    if not isinstance(prediction, dict):
        return ""
    parts = []
    if prediction.get("error"):
        parts.append(f"error: {prediction['error']}")
    output = prediction.get("output")
    if output:
        count = len(output) if isinstance(output, list) else 1
        parts.append(f"{count} output{'s' if count != 1 else ''}")
    logs = prediction.get("logs")
    lines = [line.strip() for line in logs.splitlines() if line.strip()] if isinstance(logs, str) else []
    if lines:
        parts.append(lines[-1])
    return " | ".join(parts)[:SUMMARY_WIDTH]


def event_line(message: dict[str, Any]) -> str:
    line = (
        f"{message['seq']:>8}  {message['received_at']}  {message['prediction_id']}  "
        f"{message['status']:<10}  {summary(message.get('prediction'))}"
    )
    return line.rstrip() + ("  [replayed]" if message.get("replayed") else "")


async def tail(
    base: str, token: str, prediction: str | None, after: int, out: Callable[[str], None] = print
) -> int:
    cursor = after
    path = f"/predictions/{quote(prediction, safe='')}/ws" if prediction else "/events/ws"
    headers = {"Authorization": f"Bearer {token}"}
    while True:
        try:
            async with connect(f"{base}{path}?after={cursor}", additional_headers=headers) as ws:
                async for text in ws:
                    message = json.loads(text)
                    if message.get("type") == "event":
                        out(event_line(message))
                        if not message.get("replayed"):
                            cursor = max(cursor, message["seq"])
                if ws.close_code == 1000:
                    return 0
                print(f"relay tail: closed ({ws.close_code}); resuming after seq {cursor}", file=sys.stderr)
        except websockets.InvalidStatus as error:
            status = error.response.status_code
            if status in (401, 403):
                message = f"Relay refused the admin token (HTTP {status}); check RELAY_ADMIN_TOKEN"
                raise ConfigError(message) from None
            print(f"relay tail: handshake failed (HTTP {status}); retrying", file=sys.stderr)
        except websockets.ConnectionClosed as error:
            if error.rcvd is not None and error.rcvd.code == POLICY_VIOLATION:
                # Relay refuses the request itself (an `after=` beyond the log's head): asking
                # again gets the same answer, so say why once and stop.
                raise ConfigError(f"Relay refused the stream: {error.rcvd.reason} (check --after)") from None
            print(
                f"relay tail: disconnected ({type(error).__name__}); resuming after seq {cursor}",
                file=sys.stderr,
            )
        except (OSError, TimeoutError, websockets.InvalidHandshake) as error:
            reason = type(error).__name__
            print(f"relay tail: disconnected ({reason}); resuming after seq {cursor}", file=sys.stderr)
        await asyncio.sleep(RECONNECT_DELAY)
