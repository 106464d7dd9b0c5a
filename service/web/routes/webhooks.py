"""`POST /webhooks/replicate`: size limit, signature, parse, group commit, then 200.

The endpoint is a bare ASGI callable, not a Starlette request handler, and `app.RelayApp` calls
it directly for POSTs: it is the one hot path, and Starlette's middleware, router, per-call
request/response wrapping and `JSONResponse` cost about a fifth of its CPU (bench/ingest.py).
"""

from __future__ import annotations

import logging
import time
from urllib.parse import parse_qs

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from service.batches import store as batch_store
from service.batches.links import QUERY_NAME, parse_ref
from service.core.errors import BodyIncomplete, BodyTooLarge, RelayError
from service.core.logcontext import bind, printable_id
from service.core.metrics import DELIVERIES, DUPLICATES, INGEST_SECONDS, REJECTS
from service.core.openapi import errors, header_param, json_body, operation
from service.core.signatures import verify
from service.core.statuses import is_terminal
from service.db.store import Delivery
from service.ingest.committer import webhook_delivery
from service.web import auth
from service.web.auth import route
from service.web.responses import error_response
from service.web.state import Relay, relay_of

log = logging.getLogger("relay.webhooks")

# Bound once: `labels()` takes a lock and a dict lookup on every call.
STORED, DUPLICATE, REJECTED = (DELIVERIES.labels(outcome) for outcome in ("stored", "duplicate", "rejected"))


async def read_body(request: Request, limit: int, setting: str = "RELAY_MAX_BODY") -> bytes:
    """The body, refusing it as soon as it is known to exceed `limit` bytes (the value of the
    variable named `setting`, which the 413 names)."""
    declared = request.headers.get("content-length", "")
    # Digits only, and no int() of a huge digit string (Python refuses past 4,300 digits).
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise BodyTooLarge(f"the body is {declared} bytes; {setting} allows {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the body exceeds {setting} ({limit} bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BodyIncomplete("the client disconnected before sending the whole body") from None
    return b"".join(chunks)


def acknowledgement(seq: int, duplicate: bool) -> bytes:
    """`{"seq": …, "duplicate": …}`, the same bytes `JSONResponse` would send."""
    return b'{"seq":%d,"duplicate":%s}' % (seq, b"true" if duplicate else b"false")


async def send_json(send: Send, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def bind_batch_item(relay: Relay, query_string: bytes, delivery: Delivery) -> bool:
    """A delivery to a batch item's URL binds its prediction to the item before it is stored,
    so the batch's stream knows the prediction by its first event and a create whose answer
    was lost still finds its item. Whether the URL named a batch item."""
    values = parse_qs(query_string.decode("latin-1")).get(QUERY_NAME)
    ref = parse_ref(values[0], relay.batch_link_key) if values else None
    if ref is None:
        return False
    scheduler = relay.scheduler
    if scheduler is not None and scheduler.knows_bound(ref):
        return True  # this process recorded the create's answer: already bound
    async with relay.pool.acquire() as conn:
        owner = await batch_store.bind(conn, ref, delivery.prediction_id)
        if owner is not None and scheduler is not None and scheduler.owners is not None:
            await scheduler.owners(conn, delivery.prediction_id, owner)
    if scheduler is not None:
        scheduler.remember_bound(ref)
    return True


class WebhookEndpoint:
    """An ASGI app (a class, so Starlette's `Route` does not wrap it as a request handler)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        relay = relay_of(request)
        started = time.perf_counter()
        claimed_id = printable_id(request.headers.get("webhook-id"))
        bind(webhook_id=claimed_id)
        try:
            body = await read_body(request, relay.settings.max_body)
            webhook_id, timestamp = verify(
                request.headers, body, relay.webhook_keys, relay.settings.webhook_tolerance
            )
            delivery = webhook_delivery(body, webhook_id, timestamp)
            bind(prediction_id=delivery.prediction_id)
            item = scope["query_string"] and await bind_batch_item(relay, scope["query_string"], delivery)
            appended = await relay.committer.submit(delivery)
            if item and relay.scheduler is not None and is_terminal(delivery.status):
                relay.scheduler.nudge()  # once committed, so the scheduler sees the item ended
        except RelayError as error:
            REJECTS.labels(error.code).inc()
            REJECTED.inc()
            # Once per refused delivery: its code and claimed id, never its body or headers' secrets.
            log.warning("webhook refused (%s): %s", error.code, error.message, extra={"code": error.code})
            await error_response(error)(scope, receive, send)
            return
        bind(seq=appended.seq)
        INGEST_SECONDS.observe(time.perf_counter() - started)
        if appended.duplicate:
            DUPLICATES.inc()
        (DUPLICATE if appended.duplicate else STORED).inc()
        await send_json(send, acknowledgement(appended.seq, appended.duplicate))


PATH = "/webhooks/replicate"
endpoint = WebhookEndpoint()
routes = [route(PATH, endpoint, access=auth.SIGNED, methods=["POST"])]

ACKNOWLEDGEMENT = {
    "type": "object",
    "required": ["seq", "duplicate"],
    "properties": {"seq": {"type": "integer"}, "duplicate": {"type": "boolean"}},
}
openapi = {
    PATH: {
        "post": operation(
            "Receive a signed Replicate webhook",
            tag="webhooks",
            description="Standard Webhooks signature over `{webhook-id}.{webhook-timestamp}.{body}` with "
            "REPLICATE_WEBHOOK_SECRET. A 200 is sent only once the delivery is committed; a repeated "
            "webhook-id answers the first delivery's seq with `duplicate: true`.",
            parameters=[
                header_param("webhook-id", "unique per delivery; Replicate reuses it when it retries"),
                header_param("webhook-timestamp", "Unix seconds, within RELAY_WEBHOOK_TOLERANCE"),
                header_param("webhook-signature", "space-separated `v1,<base64 HMAC-SHA256>` entries"),
            ],
            body={
                "type": "object",
                "description": "Replicate's prediction object",
                "required": ["id", "status"],
                "properties": {"id": {"type": "string"}, "status": {"type": "string"}},
            },
            responses={
                200: json_body(ACKNOWLEDGEMENT, "Stored (or already stored)"),
                **errors(400, 401, 413),
            },
        )
    }
}
