"""The Starlette application: resources in one lifespan, routes gathered from their modules."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import dashboard, migrations, predictions_api, reading, sockets, webhooks
from .errors import RelayError
from .fanout import Hub
from .ingest import GroupCommitter
from .reconcile import Reconciler
from .settings import Settings
from .upstream import Upstream

log = logging.getLogger("relay")

POOL_SIZE = 10
CONNECT_TIMEOUT = 5.0


@dataclass
class Relay:
    """What handlers share: settings and the per-process resources built in the lifespan."""

    settings: Settings
    dsn: str
    pool: asyncpg.Pool = field(init=False)
    committer: GroupCommitter = field(init=False)
    hub: Hub = field(init=False)
    webhook_keys: tuple[bytes, ...] = field(init=False)
    upstream: Upstream | None = field(init=False, default=None)
    background: set[asyncio.Task] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.webhook_keys = self.settings.webhook_keys

    def connect(self) -> asyncpg.Connection:
        return asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT)


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    relay: Relay = request.app.state.relay
    try:
        async with relay.pool.acquire(timeout=2) as conn:
            missing = await asyncio.wait_for(migrations.pending(conn), 2)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not ready"
        return JSONResponse(
            {"status": "unavailable", "reason": f"database unreachable ({type(exc).__name__})"},
            status_code=503,
        )
    if missing:
        names = ", ".join(p.stem for p in missing)
        return JSONResponse(
            {"status": "unavailable", "reason": f"migrations not applied: {names}; run relay migrate"},
            status_code=503,
        )
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def relay_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RelayError)
    return error.response()


def start_upstream(relay: Relay) -> None:
    """The Replicate client and the periodic reconcile, when an upstream token is configured."""
    settings = relay.settings
    if settings.replicate_api_token is None:
        return
    relay.upstream = Upstream(settings)
    reconciler = Reconciler(relay.pool, relay.committer, relay.upstream)
    task = asyncio.create_task(
        reconciler.run(settings.reconcile_interval, settings.reconcile_after), name="relay-reconcile"
    )
    relay.background.add(task)  # a strong reference, so the task is never garbage collected


async def stop_background(relay: Relay) -> None:
    for task in relay.background:
        task.cancel()
    await asyncio.gather(*relay.background, return_exceptions=True)
    relay.background.clear()
    if relay.upstream is not None:
        await relay.upstream.aclose()


class RelayApp(Starlette):
    """Starlette, except that `POST /webhooks/replicate` goes straight to its endpoint.

    Skipping the middleware stack and the router there took server CPU per delivery from about
    108 to 90 µs (bench/ingest.py, no subscribers). So middleware added to this app does not see
    webhook POSTs; the endpoint answers its own errors, and other methods reach the router (405).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == webhooks.PATH:
            scope["app"] = self
            await webhooks.endpoint(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, dsn: str) -> Starlette:
    relay = Relay(settings, dsn)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        relay.pool = await asyncpg.create_pool(dsn, min_size=2, max_size=POOL_SIZE, timeout=CONNECT_TIMEOUT)
        relay.committer = GroupCommitter(relay.pool)
        relay.committer.start()
        relay.hub = Hub(relay.pool, relay.connect)
        await relay.hub.start()
        start_upstream(relay)
        try:
            yield
        finally:
            await stop_background(relay)
            await relay.hub.stop()
            await relay.committer.stop()
            await relay.pool.close()

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        *webhooks.routes,
        *reading.routes,
        *sockets.routes,
        *predictions_api.routes,
        *dashboard.routes,
    ]
    app = RelayApp(routes=routes, lifespan=lifespan, exception_handlers={RelayError: relay_error})
    app.state.relay = relay
    return app
