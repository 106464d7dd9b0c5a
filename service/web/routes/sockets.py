"""WebSocket streams: backlog from the log, `caught_up`, then live events from the hub.

The page's `Origin` (`origins.py`), then the token, are checked before the handshake is
accepted (the routes' declared access, `service.web.auth`): a refused client gets an HTTP 403
and no event; a bad `after` closes the socket with
1008 and a reason. Each accepted socket has a bounded queue filled by the hub and one task that
writes to it; the handler waits for whichever comes first: the writer finishing (terminal
event), the client leaving, or the hub stopping the subscriber (1013 when it fell behind, 1001
on shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Coroutine
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from service.core.errors import RelayError
from service.core.logcontext import bind
from service.core.metrics import MESSAGES_SENT
from service.core.statuses import is_terminal
from service.db import store
from service.db.events import event_text
from service.live.hub import Subscriber
from service.web import auth
from service.web.auth import POLICY_VIOLATION, socket_route
from service.web.routes.reading import int_param
from service.web.state import Relay, relay_of

log = logging.getLogger("relay.sockets")

BACKLOG_PAGE = 500
INTERNAL_ERROR = 1011
# A client that stopped reading cannot take a close frame; give up on it after this long.
CLOSE_WAIT = 5.0
MAX_CLOSE_REASON = 123  # bytes (RFC 6455: 125 for the payload, 2 of them the code)


async def prediction_stream(websocket: WebSocket) -> None:
    await stream(websocket, websocket.path_params["prediction_id"])


async def all_events_stream(websocket: WebSocket) -> None:
    await stream(websocket, None)


async def stream(websocket: WebSocket, prediction_id: str | None) -> None:
    relay = relay_of(websocket)
    bind(prediction_id=prediction_id)  # this socket's task: its log lines name its prediction
    await websocket.accept()
    try:
        after = int_param(websocket, "after", 0)  # type: ignore[arg-type]
    except RelayError as error:
        await websocket.close(POLICY_VIOLATION, close_reason(error.message))
        return
    subscriber = Subscriber(prediction_id, relay.settings.ws_queue_size, after, relay.settings.ws_queue_bytes)
    await serve_subscriber(websocket, relay, subscriber, deliver(websocket, relay, subscriber, after))


async def serve_subscriber(
    websocket: WebSocket, relay: Relay, subscriber: Subscriber, deliveries: Coroutine[None, None, int | None]
) -> None:
    """Subscribe, run `deliveries` until it, the client or the hub ends the stream, close with
    the code that says why (the hub's first), and unsubscribe whatever happened."""
    relay.hub.subscribe(subscriber)
    try:
        code = await first_to_end(deliveries, wait_for_disconnect(websocket), subscriber.stopped.wait())
        code = subscriber.stop_code or code
        if code is not None:
            await close(websocket, code)
    finally:
        relay.hub.unsubscribe(subscriber)


def close_reason(text: str) -> str:
    """`text` cut to the 123 UTF-8 bytes a close frame can carry: a longer reason (an `after`
    echoed back in 4-byte characters) made the close itself fail, and the client saw 1006."""
    return text.encode()[:MAX_CLOSE_REASON].decode(errors="ignore")


async def first_to_end(
    deliveries: Coroutine[None, None, int | None],
    disconnect: Coroutine[None, None, None],
    stopped: Coroutine[None, None, object],
) -> int | None:
    """Run the three until one ends; return the close code to send, if any."""
    writer = asyncio.ensure_future(deliveries)
    others = [asyncio.ensure_future(disconnect), asyncio.ensure_future(stopped)]
    await asyncio.wait([writer, *others], return_when=asyncio.FIRST_COMPLETED)
    for task in (writer, *others):
        task.cancel()
    await asyncio.gather(writer, *others, return_exceptions=True)
    if writer.cancelled():
        return None  # the client left, or the hub stopped the subscriber (the caller knows why)
    error = writer.exception()
    if error is None:
        return writer.result()
    if not isinstance(error, WebSocketDisconnect | OSError):
        log.warning("a stream failed (%s); closing it with 1011", type(error).__name__)
    return INTERNAL_ERROR  # if the client is still there, it reconnects with after=


async def deliver(websocket: WebSocket, relay: Relay, subscriber: Subscriber, after: int) -> int | None:
    """The backlog up to the log's horizon, `caught_up`, then live messages; the close code at the end.

    The horizon is read after subscribing, so every event committed before the client connected
    is in the backlog, even one this process's hub has not read yet.
    """
    async with relay.pool.acquire() as conn:
        horizon = await store.max_seq(conn)
    if after > horizon:
        # Nothing past the head exists yet, so waiting could only skip the events in between:
        # the cursor came from elsewhere (another database, a typo). Refuse it and say why.
        reason = f"after={after} is beyond the log's head ({horizon}); resume from caught_up.seq"
        await websocket.close(POLICY_VIOLATION, close_reason(reason))
        return None
    subscriber.live_from = max(subscriber.live_from, horizon)
    last, ended = await send_backlog(websocket, relay, subscriber.prediction_id, after, horizon)
    await websocket.send_text(json.dumps({"type": "caught_up", "seq": max(last, horizon)}))
    if ended:
        return 1000
    return await write_live(websocket, subscriber, close_on_terminal=subscriber.prediction_id is not None)


async def send_backlog(
    websocket: WebSocket, relay: Relay, prediction_id: str | None, after: int, horizon: int
) -> tuple[int, bool]:
    """Send stored events in (after, horizon]; return the last seq sent and whether the
    prediction had already ended by the horizon (so the stream ends after `caught_up`)."""
    pool, last = relay.pool, after
    while last < horizon:
        async with pool.acquire() as conn:
            rows = await store.fetch_events(
                conn, prediction_id=prediction_id, after=last, up_to=horizon, limit=BACKLOG_PAGE
            )
        for row in rows:
            await websocket.send_text(event_text(row, relay.vault))
            MESSAGES_SENT.inc()
            last = row["seq"]
        if not store.page_may_continue(rows, BACKLOG_PAGE):
            break
    if prediction_id is None:
        return last, False
    async with pool.acquire() as conn:
        state = await store.fetch_prediction(conn, prediction_id)
    ended = state is not None and is_terminal(state["status"]) and state["seq"] <= horizon
    return last, ended


async def write_live(websocket: WebSocket, subscriber: Subscriber, close_on_terminal: bool) -> int:
    while True:
        message = await subscriber.next()
        if not subscriber.wants(message):
            continue  # queued before the horizon was known: the backlog had it
        await websocket.send_text(message.text)
        MESSAGES_SENT.inc()
        if close_on_terminal and message.terminal:
            return 1000


async def wait_for_disconnect(websocket: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass


async def close(websocket: WebSocket, code: int) -> None:
    with contextlib.suppress(TimeoutError, WebSocketDisconnect, OSError, RuntimeError):
        await asyncio.wait_for(websocket.close(code), CLOSE_WAIT)


# WebSocket routes are outside OpenAPI's HTTP model: docs/api.md describes them.
openapi: dict[str, dict[str, dict[str, Any]]] = {}

routes = [
    socket_route("/predictions/{prediction_id}/ws", prediction_stream, access=auth.SUBSCRIBER),
    socket_route("/events/ws", all_events_stream, access=auth.ADMIN),
]
