"""`POST /webhooks/replicate`: size limit, signature, parse, group commit, then 200."""

from __future__ import annotations

import time

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .errors import BodyIncomplete, BodyTooLarge, RelayError
from .ingest import webhook_delivery
from .metrics import DELIVERIES, DUPLICATES, INGEST_SECONDS, REJECTS
from .signatures import verify


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing it as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the body is {declared} bytes; RELAY_MAX_BODY allows {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the body exceeds RELAY_MAX_BODY ({limit} bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BodyIncomplete("the client disconnected before sending the whole body") from None
    return b"".join(chunks)


async def receive_webhook(request: Request) -> JSONResponse:
    relay = request.app.state.relay
    started = time.perf_counter()
    try:
        body = await read_body(request, relay.settings.max_body)
        webhook_id, timestamp = verify(
            request.headers, body, relay.webhook_keys, relay.settings.webhook_tolerance
        )
        appended = await relay.committer.submit(webhook_delivery(body, webhook_id, timestamp))
    except RelayError as error:
        REJECTS.labels(error.code).inc()
        DELIVERIES.labels("rejected").inc()
        return error.response()
    INGEST_SECONDS.observe(time.perf_counter() - started)
    if appended.duplicate:
        DUPLICATES.inc()
    DELIVERIES.labels("duplicate" if appended.duplicate else "stored").inc()
    return JSONResponse({"seq": appended.seq, "duplicate": appended.duplicate})


routes = [Route("/webhooks/replicate", receive_webhook, methods=["POST"])]
