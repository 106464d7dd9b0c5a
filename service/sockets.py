"""WebSocket streams: backlog from the log, `caught_up`, then live events from the hub.

Each socket has a bounded queue filled by the hub and its own writer task; the handler waits
for whichever comes first: the writer finishing (terminal event), the client leaving, or the
hub stopping the subscriber (1013 when it fell behind, 1001 on shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from . import store
from .auth import require_admin, require_reader, token_from
from .errors import RelayError
from .events import dumps, event_message
from .fanout import Subscriber
from .metrics import MESSAGES_SENT
from .reading import int_param
from .statuses import Rank

BACKLOG_PAGE = 500
POLICY_VIOLATION = 1008  # closing before accept makes uvicorn answer the handshake with 403


async def prediction_stream(websocket: WebSocket) -> None:
    prediction_id = websocket.path_params["prediction_id"]
    settings = websocket.app.state.relay.settings
    try:
        token = token_from(websocket.headers, websocket.query_params)
        require_reader(token, prediction_id, settings.admin_token, settings.subscribe_key)
        after = int_param(websocket, "after", 0)  # type: ignore[arg-type]
    except RelayError:
        await websocket.close(POLICY_VIOLATION)
        return
    await stream(websocket, prediction_id, after)


async def all_events_stream(websocket: WebSocket) -> None:
    settings = websocket.app.state.relay.settings
    try:
        require_admin(token_from(websocket.headers, websocket.query_params), settings.admin_token)
        after = int_param(websocket, "after", 0)  # type: ignore[arg-type]
    except RelayError:
        await websocket.close(POLICY_VIOLATION)
        return
    await stream(websocket, None, after)


async def stream(websocket: WebSocket, prediction_id: str | None, after: int) -> None:
    relay = websocket.app.state.relay
    await websocket.accept()
    subscriber = Subscriber(prediction_id, relay.settings.ws_queue_size)
    horizon = relay.hub.subscribe(subscriber)
    # The hub may not have read up to the client's cursor yet: never send it live what it had.
    subscriber.live_from = max(horizon, after)
    try:
        last, ended = await send_backlog(websocket, relay, prediction_id, after, horizon)
        caught_up = max(last, horizon)
        await websocket.send_text(json.dumps({"type": "caught_up", "seq": caught_up}))
        code = 1000 if ended else await pump(websocket, subscriber, prediction_id is not None)
        if code is not None:
            await websocket.close(code)
    except (WebSocketDisconnect, OSError, RuntimeError):
        pass  # the client left; nothing to clean up beyond unsubscribing
    finally:
        relay.hub.unsubscribe(subscriber)


async def send_backlog(
    websocket: WebSocket, relay, prediction_id: str | None, after: int, horizon: int
) -> tuple[int, bool]:
    """Send stored events in (after, horizon]; return the last seq sent and whether the
    prediction had already ended by the horizon (so the stream ends after `caught_up`)."""
    pool, last = relay.pool, after
    while True:
        async with pool.acquire() as conn:
            rows = await store.fetch_events(
                conn, prediction_id=prediction_id, after=last, up_to=horizon, limit=BACKLOG_PAGE
            )
        for row in rows:
            await websocket.send_text(dumps(event_message(row, relay.vault)))
            MESSAGES_SENT.inc()
            last = row["seq"]
        if len(rows) < BACKLOG_PAGE:
            break
    if prediction_id is None:
        return last, False
    async with pool.acquire() as conn:
        state = await conn.fetchrow(
            "SELECT status_rank, state_seq FROM predictions WHERE prediction_id = $1", prediction_id
        )
    ended = state is not None and state["status_rank"] == Rank.TERMINAL and state["state_seq"] <= horizon
    return last, ended


async def pump(websocket: WebSocket, subscriber: Subscriber, close_on_terminal: bool) -> int | None:
    """Deliver live messages until one side ends; return the close code to send, if any."""
    writer = asyncio.create_task(write_live(websocket, subscriber, close_on_terminal))
    reader = asyncio.create_task(wait_for_disconnect(websocket))
    stopper = asyncio.create_task(subscriber.stopped.wait())
    done, pending = await asyncio.wait({writer, reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if writer in done and writer.exception() is None:
        return writer.result()
    if stopper in done:
        return subscriber.stop_code
    return None


async def write_live(websocket: WebSocket, subscriber: Subscriber, close_on_terminal: bool) -> int:
    while True:
        message = await subscriber.queue.get()
        await websocket.send_text(message.text)
        MESSAGES_SENT.inc()
        if close_on_terminal and message.terminal:
            return 1000


async def wait_for_disconnect(websocket: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass


routes = [
    WebSocketRoute("/predictions/{prediction_id}/ws", prediction_stream),
    WebSocketRoute("/events/ws", all_events_stream),
]
