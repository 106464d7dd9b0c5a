"""`/api/batches`: submit, read, list and cancel batches; `WS /batches/{id}/ws` streams their events.

Every call needs the admin token or a key from RELAY_API_KEYS; a batch belongs to the key that
submitted it (another key gets 404), the admin token sees every batch. The scheduling itself
is `service.batches.scheduler`, started in the app's lifespan when an upstream is configured.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
from typing import Any

import asyncpg
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse
from starlette.websockets import WebSocket

from service.batches import store as batches
from service.batches.requests import MAX_CONCURRENCY, MAX_INPUTS, batch_request
from service.batches.scheduler import Scheduler
from service.core.auth import matches_any, mint_batch_token, require_batch_reader, token_from
from service.core.errors import InvalidRequest, NotFound, RelayError
from service.core.metrics import MESSAGES_SENT
from service.core.openapi import ADMIN, API_KEY, errors, json_body, operation, path_param, query_param, ref
from service.core.validation import MODEL_PATTERN, VERSION_PATTERN, WEBHOOK_EVENTS, pinned_version
from service.db import store
from service.db.connection import Connection
from service.db.events import event_text, open_body
from service.live.hub import Message, Subscriber
from service.upstream import ratelimit, versions
from service.upstream.ratelimit import Quota
from service.web import auth
from service.web.auth import POLICY_VIOLATION, Access, Caller, route, socket_route, token_of
from service.web.routes.api import ProxyDisabled, model_rules
from service.web.routes.dashboard import NO_CACHE, PAGE_HEADERS, STATIC
from service.web.routes.reading import int_param
from service.web.routes.sockets import serve_subscriber
from service.web.routes.webhooks import read_body
from service.web.state import Relay, relay_of

ADMIN_OWNER = "admin"
MAX_SEQ = 2**63 - 1
BATCH_ID = re.compile(r"^b_[0-9a-f]{32}$")
# 10,000 inputs of about a kilobyte each; larger than RELAY_API_MAX_BODY on purpose.
MAX_BATCH_BODY = 16 * 1024 * 1024
DEFAULT_ITEMS, MAX_ITEMS = 100, 1000
DEFAULT_LIST, MAX_LIST = 50, 200
BACKLOG_PAGE = 500
# While nothing arrives, how often a batch stream checks whether the batch has ended (an item
# can end without an event: its create was refused).
END_CHECK = 1.0
OUTSIDERS_KEPT = 10_000  # other predictions a batch stream remembers as not its own


class Conflict(RelayError):
    status = 409
    code = "CONFLICT"


async def caller(request: Request) -> tuple[str | None, Quota]:
    """Count the request against the caller's key; the owner to filter by (None for the admin)."""
    relay = relay_of(request)
    settings = relay.settings
    key = token_of(request)  # admitted by the route's API_KEY access
    quota = await ratelimit.take(relay.pool, key, settings.api_rate_limit)
    return (None if matches_any(key, [settings.admin_token]) else ratelimit.key_hash(key)), quota


def scheduler_of(relay: Relay, quota: Quota) -> Scheduler:
    if relay.scheduler is None:
        raise ProxyDisabled(
            "batches are off: set REPLICATE_API_TOKEN (or REPLICATE_API_KEY) to a Replicate API "
            "token and restart Relay",
            headers=quota.headers(),
        )
    return relay.scheduler


def relay_links(relay: Relay, batch_id: str) -> dict[str, str]:
    settings = relay.settings
    return {
        "ws": f"{settings.ws_base_url}/batches/{batch_id}/ws",
        "token": mint_batch_token(settings.subscribe_key, batch_id),
    }


async def read_batch_json(request: Request) -> Any:
    # Not RELAY_MAX_BODY (the webhooks' limit), which the 413 would otherwise name.
    body = await read_body(request, MAX_BATCH_BODY, "the batch body limit")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidRequest("the body is not valid JSON") from None


async def submit_batch(request: Request) -> JSONResponse:
    relay = relay_of(request)
    owner, quota = await caller(request)
    scheduler = scheduler_of(relay, quota)
    body = await read_batch_json(request)
    # A version id Relay has learned (bare or pinned) is checked with its model's rules, as a
    # single create's is.
    learned = await versions.lookup(relay.pool, pinned_version(body))
    checked = batch_request(body, relay.settings.webhook_url, learned)
    async with relay.pool.acquire() as conn:
        row = await batches.insert_batch(conn, owner or ADMIN_OWNER, checked, relay.vault)
    scheduler.nudge()
    answer = {
        **batches.batch_fields(row, {"pending": row["total"]}),
        "relay": relay_links(relay, row["id"]),
    }
    return JSONResponse(answer, status_code=201, headers=quota.headers())


async def owned_batch(conn: Connection, batch_id: str, owner: str | None) -> asyncpg.Record:
    # An id that cannot be a batch's (NUL and other bytes Postgres refuses) is simply unknown.
    row = await batches.fetch_batch(conn, batch_id, owner) if BATCH_ID.match(batch_id) else None
    if row is None:
        raise NotFound(f"no batch {batch_id[:60]!r}")
    return row


def item_view(row: asyncpg.Record, relay: Relay) -> dict[str, Any]:
    prediction = open_body(row, relay.vault) if row["body"] is not None else None
    found = prediction if isinstance(prediction, dict) else {}
    error = row["error"] if row["error"] is not None else found.get("error")
    return {
        "index": row["index"],
        "status": row["status"],
        "prediction_id": row["prediction_id"],
        "output": found.get("output"),
        "error": error,
    }


async def get_batch(request: Request) -> JSONResponse:
    relay = relay_of(request)
    owner, quota = await caller(request)
    after = int_param(request, "after", -1, maximum=MAX_INPUTS) if request.query_params.get("after") else -1
    limit = int_param(request, "limit", DEFAULT_ITEMS, minimum=1, maximum=MAX_ITEMS)
    batch_id = request.path_params["batch_id"]
    async with relay.pool.acquire() as conn:
        row = await owned_batch(conn, batch_id, owner)
        counts = await batches.counts(conn, [batch_id])
        items = await batches.items_page(conn, batch_id, after, limit)
    body = {
        **batches.batch_fields(row, counts[batch_id]),
        "items": [item_view(item, relay) for item in items],
        "next_after": items[-1]["index"] if len(items) == limit else None,
        "relay": relay_links(relay, batch_id),
    }
    return JSONResponse(body, headers=quota.headers())


async def list_batches(request: Request) -> JSONResponse:
    relay = relay_of(request)
    owner, quota = await caller(request)
    limit = int_param(request, "limit", DEFAULT_LIST, minimum=1, maximum=MAX_LIST)
    async with relay.pool.acquire() as conn:
        rows = await batches.list_batches(conn, owner, limit)
        counts = await batches.counts(conn, [row["id"] for row in rows])
    listed = [batches.batch_fields(row, counts[row["id"]]) for row in rows]
    return JSONResponse({"batches": listed}, headers=quota.headers())


async def cancel_batch(request: Request) -> JSONResponse:
    relay = relay_of(request)
    owner, quota = await caller(request)
    scheduler = scheduler_of(relay, quota)
    batch_id = request.path_params["batch_id"]
    async with relay.pool.acquire() as conn:
        await owned_batch(conn, batch_id, owner)
        outcome = await batches.request_cancel(conn, batch_id)
        if outcome == "canceled":
            raise Conflict(f"batch {batch_id} is already canceled", headers=quota.headers())
        if outcome == "ended":
            raise Conflict(f"batch {batch_id} has already ended; nothing to cancel", headers=quota.headers())
        row = await owned_batch(conn, batch_id, owner)
        counts = await batches.counts(conn, [batch_id])
    scheduler.nudge()  # the scheduler cancels the unfinished items upstream
    body = {**batches.batch_fields(row, counts[batch_id]), "relay": relay_links(relay, batch_id)}
    return JSONResponse(body, status_code=202, headers=quota.headers())


# ---- WS /batches/{id}/ws ---------------------------------------------------------------------


class BatchReader(Access):
    """The admin token, or a token whose `batch` claim is the path's batch."""

    scheme = "batch-reader"

    async def admit(self, connection: HTTPConnection) -> Caller:
        settings = relay_of(connection).settings
        token = token_from(connection.headers, connection.query_params)
        batch_id = connection.path_params["batch_id"]
        require_batch_reader(token, batch_id, settings.admin_token, settings.subscribe_key)
        return Caller(token=token, admin=matches_any(str(token), [settings.admin_token]))


BATCH_READER = BatchReader()


async def batch_stream(websocket: WebSocket) -> None:
    relay = relay_of(websocket)
    settings = relay.settings
    batch_id = websocket.path_params["batch_id"]
    await websocket.accept()
    try:
        after = int_param(websocket, "after", 0, maximum=MAX_SEQ)  # type: ignore[arg-type]
    except RelayError as error:
        await websocket.close(POLICY_VIOLATION, error.message)
        return
    async with relay.pool.acquire() as conn:
        known = await batches.fetch_batch(conn, batch_id, None) if BATCH_ID.match(batch_id) else None
    if known is None:
        await websocket.close(POLICY_VIOLATION, "no such batch")
        return
    # Every event, filtered here by membership: a batch's predictions are bound to their items
    # before their first event commits (links.py), so a lookup after seeing one is final.
    subscriber = Subscriber(None, settings.ws_queue_size, after)
    await serve_subscriber(
        websocket, relay, subscriber, BatchStream(websocket, relay, subscriber, batch_id).run(after)
    )


class BatchStream:
    def __init__(self, websocket: WebSocket, relay: Relay, subscriber: Subscriber, batch_id: str):
        self.websocket, self.relay, self.subscriber, self.batch_id = websocket, relay, subscriber, batch_id
        self.members: set[str] = set()  # at most the batch's items
        # Other predictions seen live, most recent last: bounded, so a page left open on a busy
        # server stays small (one forgotten may be looked up again; the answer is final anyway).
        self.outsiders: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.last = 0

    async def run(self, after: int) -> int:
        """Backlog up to the log's horizon, `caught_up`, live events; 1000 once every item ended."""
        async with self.relay.pool.acquire() as conn:
            horizon = await store.max_seq(conn)
        self.subscriber.live_from = max(self.subscriber.live_from, horizon)
        self.last = after
        await self._backlog(horizon)
        caught_up = json.dumps({"type": "caught_up", "seq": max(self.last, horizon)})
        await self.websocket.send_text(caught_up)
        self.last = max(self.last, horizon)
        if await self._ended():
            return 1000
        while True:
            try:
                async with asyncio.timeout(END_CHECK):
                    message = await self.subscriber.queue.get()
            except TimeoutError:
                if await self._ended():
                    return 1000
                continue
            await self._send(message)
            if message.terminal and self.subscriber.queue.empty() and await self._ended():
                return 1000

    async def _backlog(self, horizon: int) -> None:
        while self.last < horizon:
            async with self.relay.pool.acquire() as conn:
                rows = await batches.batch_events(conn, self.batch_id, self.last, horizon, BACKLOG_PAGE)
            for row in rows:
                await self.websocket.send_text(event_text(row, self.relay.vault))
                MESSAGES_SENT.inc()
                self.last = row["seq"]
            if len(rows) < BACKLOG_PAGE:
                return

    async def _send(self, message: Message) -> None:
        if self.subscriber.wants(message) and await self._member(message.prediction_id):
            await self.websocket.send_text(message.text)
            MESSAGES_SENT.inc()
        if not message.replayed:
            self.last = max(self.last, message.seq)

    async def _member(self, prediction_id: str) -> bool:
        if prediction_id in self.members:
            return True
        if prediction_id in self.outsiders:
            self.outsiders.move_to_end(prediction_id)
            return False
        async with self.relay.pool.acquire() as conn:
            member = await batches.is_member(conn, self.batch_id, prediction_id)
        if member:
            self.members.add(prediction_id)
        else:
            self.outsiders[prediction_id] = None
            if len(self.outsiders) > OUTSIDERS_KEPT:
                self.outsiders.popitem(last=False)
        return member

    async def _ended(self) -> bool:
        async with self.relay.pool.acquire() as conn:
            final = await batches.end_seq(conn, self.batch_id)
        return final is not None and final <= self.last


async def batch_page(request: Request) -> FileResponse:
    """`/batches` (every batch) and `/b/{id}` (one batch); the script reads the path."""
    return FileResponse(STATIC / "batch.html", headers={**PAGE_HEADERS, **NO_CACHE})


BATCH_ID_PARAM = path_param("batch_id", "the batch id", {"type": "string"})
BATCH = {
    "type": "object",
    "required": ["id", "status", "total", "concurrency", "counts"],
    "properties": {
        "id": {"type": "string"},
        "status": {"type": "string"},
        "total": {"type": "integer"},
        "concurrency": {"type": "integer"},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "relay": {"type": "object"},
        "items": {"type": "array", "items": {"type": "object"}},
        "next_after": {"type": ["integer", "null"]},
    },
}
SUBMIT = {
    "type": "object",
    "description": "Exactly one of `version` or `model`; every input is checked as a single create's "
    "would be (model rules included), and one bad input refuses the batch.",
    "required": ["inputs"],
    "oneOf": [{"required": ["version"]}, {"required": ["model"]}],
    "additionalProperties": False,
    "properties": {
        "version": {"type": "string", "pattern": VERSION_PATTERN},
        "model": {"type": "string", "pattern": MODEL_PATTERN},
        "inputs": {"type": "array", "minItems": 1, "maxItems": MAX_INPUTS, "items": ref("StorableObject")},
        "concurrency": {"type": "integer", "minimum": 1, "maximum": MAX_CONCURRENCY},
        "webhook_events_filter": {"type": "array", "minItems": 1, "items": {"enum": list(WEBHOOK_EVENTS)}},
    },
    "allOf": model_rules("inputs", many=True),
}
BATCH_ERRORS = (400, 401, 403, 404, 429)
PAGE = {"description": "The batch page", "content": {"text/html": {"schema": {"type": "string"}}}}
openapi = {
    "/batches": {"get": operation("The batches page", tag="dashboard", responses={200: PAGE})},
    "/b/{batch_id}": {
        "get": operation(
            "One batch's page", tag="dashboard", parameters=[path_param("batch_id")], responses={200: PAGE}
        )
    },
    "/api/batches": {
        "post": operation(
            "Submit a batch of predictions",
            tag="batches",
            security=[API_KEY, ADMIN],
            body=SUBMIT,
            responses={201: json_body(BATCH, "Accepted"), **errors(400, 401, 403, 413, 429)},
        ),
        "get": operation(
            "This key's batches",
            tag="batches",
            security=[API_KEY, ADMIN],
            parameters=[query_param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST})],
            responses={
                200: json_body(
                    {
                        "type": "object",
                        "required": ["batches"],
                        "properties": {"batches": {"type": "array", "items": BATCH}},
                    }
                ),
                **errors(400, 401, 403, 429),
            },
        ),
    },
    "/api/batches/{batch_id}": {
        "get": operation(
            "A batch, its counts and a page of its items",
            tag="batches",
            security=[API_KEY, ADMIN],
            parameters=[
                BATCH_ID_PARAM,
                query_param("after", {"type": "integer", "minimum": 0, "maximum": MAX_INPUTS}, "item index"),
                query_param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_ITEMS}),
            ],
            responses={200: json_body(BATCH), **errors(*BATCH_ERRORS)},
        )
    },
    "/api/batches/{batch_id}/cancel": {
        "post": operation(
            "Cancel a batch: no new items, unfinished ones canceled upstream",
            tag="batches",
            security=[API_KEY, ADMIN],
            parameters=[BATCH_ID_PARAM],
            responses={202: json_body(BATCH, "Canceling"), **errors(*BATCH_ERRORS, 409)},
        )
    },
}

routes = [
    route("/batches", batch_page, access=auth.PUBLIC),
    route("/b/{batch_id}", batch_page, access=auth.PUBLIC),
    route("/api/batches", submit_batch, access=auth.API_KEY, methods=["POST"]),
    route("/api/batches", list_batches, access=auth.API_KEY, methods=["GET"]),
    route("/api/batches/{batch_id}", get_batch, access=auth.API_KEY, methods=["GET"]),
    route("/api/batches/{batch_id}/cancel", cancel_batch, access=auth.API_KEY, methods=["POST"]),
    socket_route("/batches/{batch_id}/ws", batch_stream, access=BATCH_READER),
]
