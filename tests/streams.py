"""WebSocket test clients for the fan-out: stream URLs with tokens, readers, and the log to compare."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from typing import Any
from urllib.parse import urlencode

import asyncpg
import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from service.core.auth import mint_token
from service.ops.simulate import lifecycle

from .support import ADMIN_TOKEN, SUBSCRIBE_KEY, RelayProcess, post_webhook

TIMEOUT = 15.0


def token_for(prediction: str, ttl: int = 600, key: str = SUBSCRIBE_KEY) -> str:
    return mint_token(key, prediction, ttl)


def stream_url(
    relay: RelayProcess,
    prediction_id: str | None = None,
    *,
    after: int | None = None,
    token: str | None = None,
) -> str:
    """`/predictions/{id}/ws` (token: one for that prediction) or `/events/ws` (token: admin)."""
    if prediction_id is None:
        path, default = "/events/ws", ADMIN_TOKEN
    else:
        path, default = f"/predictions/{prediction_id}/ws", token_for(prediction_id)
    query = {"token": token or default}
    if after is not None:
        query["after"] = str(after)
    return f"{relay.ws_url}{path}?{urlencode(query)}"


def subscribe(url: str, **options: Any) -> connect:
    return connect(url, open_timeout=TIMEOUT, close_timeout=2, **options)


async def receive(ws: ClientConnection, timeout: float = TIMEOUT) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def read_backlog(ws: ClientConnection) -> tuple[list[dict], int]:
    """The events before `caught_up`, and the seq that `caught_up` reported."""
    events = []
    while (message := await receive(ws))["type"] == "event":
        events.append(message)
    assert message["type"] == "caught_up", message
    return events, message["seq"]


async def read_to_close(ws: ClientConnection, timeout: float = TIMEOUT) -> tuple[list[dict], int | None]:
    """Every message until the server closes; and the close code it sent."""
    messages = []
    try:
        async with asyncio.timeout(timeout):
            async for text in ws:
                messages.append(json.loads(text))
    except ConnectionClosed:
        pass
    await asyncio.wait_for(ws.wait_closed(), timeout)
    return messages, ws.close_code


async def read_through(ws: ClientConnection, last_seq: int) -> list[dict]:
    """Events until one with `seq >= last_seq` (skipping `caught_up`)."""
    events: list[dict] = []
    while not events or events[-1]["seq"] < last_seq:
        message = await receive(ws)
        if message["type"] == "event":
            events.append(message)
    return events


def seqs(messages: list[dict]) -> list[int]:
    return [m["seq"] for m in messages if m["type"] == "event"]


def processing(prediction_id: str, step: int) -> dict:
    """A `processing` delivery of one prediction, its logs showing `step`."""
    return {**lifecycle(prediction_id)[1], "logs": f"step {step}\n"}


def bulky(prediction_id: str, step: int) -> dict:
    """A `processing` delivery with 16 kB of incompressible logs: fills socket buffers quickly."""
    return {**processing(prediction_id, step), "logs": base64.b64encode(os.urandom(16_000)).decode()}


async def flood(client: httpx.Client, prediction_id: str, count: int, first_step: int = 0) -> None:
    """Post `count` bulky deliveries, four at a time."""
    for step in range(first_step, first_step + count, 4):
        await asyncio.gather(*(post_async(client, bulky(prediction_id, step + n)) for n in range(4)))


def tiny_window_socket(port: int) -> socket.socket:
    """A connected socket with a 4 KiB receive buffer: a client that stops reading is felt at once.
    (With `max_queue=1`, a websockets client stops reading as soon as one message is unread.)"""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


def post(client: httpx.Client, body: dict | bytes) -> int:
    response = post_webhook(client, body)
    assert response.status_code == 200, response.text
    return response.json()["seq"]


async def post_async(client: httpx.Client, body: dict | bytes) -> int:
    return await asyncio.to_thread(post, client, body)


def log_seqs(dsn: str, prediction_id: str | None = None, after: int = 0) -> list[int]:
    """What the log holds: the seqs a subscriber with this `after` must receive."""

    async def fetch() -> list[int]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT seq FROM events WHERE seq > $1 AND ($2::text IS NULL OR prediction_id = $2)"
                " ORDER BY seq",
                after,
                prediction_id,
            )
        finally:
            await conn.close()
        return [r["seq"] for r in rows]

    return asyncio.run(fetch())


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not found")
