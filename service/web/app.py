"""The Starlette application: resources in one lifespan, routes gathered from their modules."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.metadata
import json
import logging
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ExceptionHandler, Receive, Scope, Send

from service.archive.stores import open_store
from service.archive.worker import Archiver, Tuning
from service.batches import store as batch_store
from service.batches.scheduler import BUDGET_RECHECK, BudgetGate, Scheduler
from service.core import metrics, openapi
from service.core.errors import DatabaseUnavailable, InvalidRequest, MethodNotAllowed, NotFound, RelayError
from service.core.settings import Settings
from service.db import database, migrations, partitions
from service.destinations.manager import Destinations
from service.ingest.committer import GroupCommitter
from service.live.hub import Hub
from service.ops.replay_jobs import ReplayJobs
from service.upstream.client import Upstream
from service.upstream.reconcile import Reconciler
from service.usage import budget
from service.usage.report import month_spend
from service.web import auth
from service.web.auth import route
from service.web.logs import RequestContext
from service.web.origins import ApiCors
from service.web.responses import error_response
from service.web.routes import (
    admin,
    batches,
    dashboard,
    destinations,
    files,
    privacy,
    reading,
    sockets,
    usage,
    webhooks,
)
from service.web.routes import api as predictions_api
from service.web.routes import openapi as openapi_route
from service.web.state import CONNECT_TIMEOUT, Relay, relay_of

log = logging.getLogger("relay")

POOL_SIZE = 10
POOL_CLOSE_TIMEOUT = 5.0
HTTP_ERRORS = {404: NotFound, 405: MethodNotAllowed}


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


# What a lost or refused database connection raises in a handler (a missing socket file is a
# FileNotFoundError, a refused TCP connection a ConnectionRefusedError).
DATABASE_DOWN = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
)


async def not_ready_reason(pool: asyncpg.Pool) -> str | None:
    """Why the writer's database cannot serve Relay now (read-only, migrations pending), or None."""
    async with pool.acquire(timeout=2) as conn:
        read_only = await asyncio.wait_for(database.read_only_reason(conn), 2)
        if read_only is not None:
            return read_only
        missing = await asyncio.wait_for(migrations.pending(conn), 2)
    if missing:
        names = ", ".join(m.stem for m in missing)
        return f"migrations not applied: {names}; run relay migrate"
    return None


def unavailable(reason: str) -> JSONResponse:
    return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)


async def readyz(request: Request) -> JSONResponse:
    relay = relay_of(request)
    problem = relay.supervisor.problem()
    if problem is not None:
        return unavailable(problem)
    try:
        try:
            reason = await not_ready_reason(relay.pool)
        except DATABASE_DOWN:
            # Connections that sat idle through a database restart are dead, and the pool only
            # finds out on use: retry once on fresh ones, so the probe reports the database.
            await relay.pool.expire_connections()
            reason = await not_ready_reason(relay.pool)
    except migrations.MigrationsMissing as exc:
        return unavailable(str(exc))  # a broken install: never "ready" on a schema it cannot check
    except Exception as exc:  # noqa: BLE001 - any failure here means "not ready"
        return unavailable(f"database unreachable ({type(exc).__name__})")
    if reason is not None:
        return unavailable(reason)
    return JSONResponse({"status": "ok", **relay.hub.listen_warning()})


async def database_down(request: Request, error: Exception) -> Response:
    """503 + Retry-After instead of a 500 when the database goes away under a request."""
    if request.scope["type"] != "http":
        raise error  # only HTTP answers 503; uvicorn closes a failing socket (1011)
    log.warning("database unavailable during %s: %s", request.url.path, type(error).__name__)
    await relay_of(request).pool.expire_connections()  # see readyz
    return error_response(DatabaseUnavailable("the database is unavailable right now; retry later"))


async def metrics_page(request: Request) -> Response:
    body = metrics.exposition(relay_of(request).settings.metrics_dir)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def data_error(request: Request, error: Exception) -> Response:
    """Postgres refusing a value a request carried (class 22, data exception) is the client's
    error, 400; parameters are checked before queries, so this is only the safety net."""
    if request.scope["type"] != "http":
        raise error
    log.warning("the database refused a value in %s (%s)", request.url.path, type(error).__name__)
    return error_response(InvalidRequest("a parameter holds a value the database cannot take"))


async def relay_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RelayError)
    return error_response(error)


async def http_error(request: Request, error: Exception) -> Response:
    """Starlette's own 404 and 405 in Relay's error shape instead of plain text."""
    assert isinstance(error, HTTPException)
    return error_response(HTTP_ERRORS[error.status_code](error.detail, headers=error.headers))


def start_upstream(relay: Relay) -> None:
    """The Replicate client and the periodic reconcile, when an upstream token is configured."""
    settings = relay.settings
    if settings.replicate_api_token is None:
        return
    relay.upstream = Upstream(settings)
    reconciler = Reconciler(relay.pool, relay.committer, relay.upstream, relay.vault)
    relay.supervisor.spawn(
        "relay-reconcile", reconciler.run(settings.reconcile_interval, settings.reconcile_after)
    )


def budget_gate(relay: Relay) -> BudgetGate | None:
    """Why a batch may start no new item: this month's estimated spend has reached RELAY_BUDGET."""
    settings = relay.settings
    budget = settings.budget
    if budget is None:
        return None

    async def blocked() -> str | None:
        async with relay.pool.acquire() as conn:
            spend = await month_spend(conn, settings.prices, datetime.now(UTC))
        if spend < budget:
            return None
        return (
            f"RELAY_BUDGET reached: {spend:.2f} of {budget:.2f} USD spent this month; "
            "no new item starts until the month's spend allows"
        )

    return blocked


async def start_batches(relay: Relay) -> None:
    """The batch scheduler, driven by webhooks; it reaches Replicate through the upstream client.
    Item predictions get ownership records once `prediction_owners` exists."""
    if relay.upstream is None:
        return
    async with relay.pool.acquire() as conn:
        owners = batch_store.record_owner if await batch_store.owners_table(conn) else None
    relay.scheduler = Scheduler(
        relay.pool,
        relay.upstream,
        relay.batch_link_key,
        relay.settings.webhook_url,
        vault=relay.vault,
        budget=budget_gate(relay),
        owners=owners,
        budget_recheck=min(relay.settings.budget_interval, BUDGET_RECHECK),
    )
    relay.supervisor.spawn("relay-batches", relay.scheduler.run())


def start_budget(relay: Relay) -> None:
    """The monthly spend check, when prices or a budget are configured."""
    settings = relay.settings
    if settings.prices or settings.budget is not None:
        relay.supervisor.spawn("relay-budget", budget.watch(relay.pool, settings))


def start_destinations(relay: Relay) -> None:
    """The senders of the destinations this instance holds (each held by one instance)."""
    if not relay.settings.destinations:
        return  # RELAY_DESTINATIONS=off: `relay destinations run` sends, elsewhere
    sender = Destinations(relay.pool, relay.listen_connection, relay.vault, relay.settings)
    relay.supervisor.spawn("relay-destinations", sender.run())


async def start_archive(relay: Relay) -> None:
    """The output archive's worker (discovery and downloads), unless RELAY_ARCHIVE=off."""
    settings = relay.settings
    relay.archive_store = open_store(settings.archive)
    if relay.archive_store is None:
        return
    tuning = Tuning(concurrency=settings.archive_concurrency)
    # Each download holds a connection for its whole attempt (the job's row lock): its own pool,
    # so downloads never starve webhooks and reads of connections.
    dbs = relay.databases
    pool = await asyncpg.create_pool(
        dbs.write, min_size=1, max_size=tuning.concurrency + 2, timeout=CONNECT_TIMEOUT, **dbs.pool_options()
    )
    spool = settings.data_dir.resolve() / "archive-spool"
    archiver = Archiver(
        pool,
        relay.archive_store,
        relay.vault,
        relay.archive_policy,
        spool,
        settings.archive_max_bytes,
        tuning,
        ingest_rate=relay.committer.committed.rate,
    )

    async def run() -> None:
        try:
            await archiver.run()
        finally:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pool.close(), POOL_CLOSE_TIMEOUT)

    relay.supervisor.spawn("relay-archive", run())


HEALTH_ROUTES = [
    route("/healthz", healthz, access=auth.PUBLIC),
    route("/readyz", readyz, access=auth.PUBLIC),
    route("/metrics", metrics_page, access=auth.PUBLIC),
]
HEALTH = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"enum": ["ok", "unavailable"]}, "reason": {"type": "string"}},
}
HEALTH_OPENAPI = {
    "/healthz": {
        "get": openapi.operation(
            "The process is up", tag="health", responses={200: openapi.json_body(HEALTH)}
        )
    },
    "/readyz": {
        "get": openapi.operation(
            "The database is reachable and migrated",
            tag="health",
            responses={
                200: openapi.json_body(HEALTH),
                "503": openapi.json_body(HEALTH, "Not ready: see reason"),
            },
        )
    },
    "/metrics": {
        "get": openapi.operation(
            "Prometheus metrics",
            tag="health",
            responses={
                200: {
                    "description": "Prometheus text",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        )
    },
}
# Each module brings its `routes` and, next to them, their `openapi` operations (core/openapi.py).
# A new feature adds its route module here: its routes are served and described in one step.
ROUTE_MODULES: tuple[Any, ...] = (
    webhooks,
    reading,
    sockets,
    admin,
    predictions_api,
    batches,
    dashboard,
    privacy,
    usage,
    destinations,
    files,
    openapi_route,
)


class RelayApp(Starlette):
    """Starlette, except that `POST /webhooks/replicate` goes straight to its endpoint.

    Skipping the middleware stack and the router there took server CPU per delivery from about
    108 to 90 µs (bench/ingest.py, no subscribers). So middleware added to this app does not see
    webhook POSTs; the endpoint answers its own errors, and other methods reach the router (405).
    """

    webhook = RequestContext(webhooks.endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == webhooks.PATH:
            scope["app"] = self
            await self.webhook(scope, receive, send)
            return
        if scope["type"] in ("http", "websocket") and "\x00" in scope["path"]:
            await refuse_nul_path(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


async def refuse_nul_path(scope: Scope, receive: Receive, send: Send) -> None:
    """A NUL in a decoded path (`/predictions/a%00b`) can match no id Postgres stores, and
    Postgres text cannot even carry it: 400 (a refused handshake for a WebSocket)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await error_response(InvalidRequest("the path must not contain NUL (%00)"))(scope, receive, send)


async def open_pools(relay: Relay) -> None:
    dbs = relay.databases
    relay.pool = await asyncpg.create_pool(
        dbs.write, min_size=2, max_size=POOL_SIZE, timeout=CONNECT_TIMEOUT, **dbs.pool_options()
    )
    relay.read_pool = relay.pool
    if dbs.read != dbs.write:
        relay.read_pool = await asyncpg.create_pool(
            dbs.read, min_size=1, max_size=POOL_SIZE, timeout=CONNECT_TIMEOUT, **dbs.pool_options()
        )


async def close_pools(relay: Relay) -> None:
    # asyncpg waits for every connection to come back; one never released must not keep
    # the process alive after SIGTERM (on timeout, close() terminates the pool).
    for pool in {relay.pool, relay.read_pool}:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pool.close(), POOL_CLOSE_TIMEOUT)


def create_app(settings: Settings, dsn: str) -> Starlette:
    relay = Relay(settings, database.databases(settings, dsn))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await open_pools(relay)
        relay.replays = ReplayJobs(relay.pool)
        relay.hub = Hub(relay.pool, relay.listen_connection, relay.vault)
        await relay.hub.start(relay.supervisor)
        # With encryption on, the hub reads (and decrypts) every row from the log instead.
        handover = None if relay.vault.enabled else relay.hub.committed_here
        relay.committer = GroupCommitter(relay.pool, prepare=relay.vault.prepare, on_commit=handover)
        relay.committer.start(relay.supervisor)
        # Loops that feed the writer start after it, so that they stop before it (supervisor.stop).
        start_upstream(relay)
        await start_batches(relay)
        start_budget(relay)
        relay.supervisor.spawn("relay-partitions", partitions.keep_ahead(relay.pool))
        start_destinations(relay)
        await start_archive(relay)
        # Everything allocated so far (modules, settings, pools) lives as long as the process: out
        # of the collector's sight, a full collection took ~1 ms instead of 13-33 ms, which were
        # the tail of the webhook latency (bench/ingest.py with a gc.callbacks probe).
        gc.freeze()
        try:
            yield
        finally:
            await relay.replays.stop()  # replay jobs of /admin/replay
            await relay.hub.stop()  # subscribers first: closed with 1001
            await relay.supervisor.stop()  # last started, first stopped; the writer drains its queue
            if relay.upstream is not None:
                await relay.upstream.aclose()
            await close_pools(relay)
            metrics.forget_process(settings.metrics_dir, os.getpid())

    routes = [*HEALTH_ROUTES, *(each for module in ROUTE_MODULES for each in module.routes)]
    # CORS is off unless RELAY_CORS_ORIGINS is set: then browsers on those origins may call /api.
    middleware = [Middleware(RequestContext)]
    if settings.cors_origins:
        middleware.append(Middleware(ApiCors, origins=settings.cors_origins))
    handlers: dict[int | type[Exception], ExceptionHandler] = {
        RelayError: relay_error,
        asyncpg.DataError: data_error,
        **dict.fromkeys(HTTP_ERRORS, http_error),  # by status: Starlette's router and static files
        **dict.fromkeys(DATABASE_DOWN, database_down),
    }
    app = RelayApp(routes=routes, middleware=middleware, lifespan=lifespan, exception_handlers=handlers)
    app.state.relay = relay
    app.state.openapi_json = json.dumps(openapi_document()).encode()
    return app


def openapi_document() -> dict[str, Any]:
    """Every route module's operations in one OpenAPI 3.1 document."""
    try:
        version = importlib.metadata.version("relay")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return openapi.document([HEALTH_OPENAPI, *(module.openapi for module in ROUTE_MODULES)], version)
