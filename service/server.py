"""`relay serve`: database, migrations, the start-up banner, then uvicorn."""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from . import database
from .app import create_app
from .settings import Settings
from .vault import Vault, check_keys

log = logging.getLogger("relay")

SHUTDOWN_CLOSE_WAIT = 2.0


class RelayServer(uvicorn.Server):
    """uvicorn closes open sockets with 1012; Relay first closes them with 1001 (going away).

    A socket whose client stopped reading cannot take that close frame, and uvicorn would wait
    its whole graceful timeout for it; after SHUTDOWN_CLOSE_WAIT Relay drops such sockets.
    uvicorn also re-raises SIGTERM/SIGINT after a graceful shutdown, which would kill the process
    before `atexit` stops the embedded Postgres; Relay exits normally (status 0) instead.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        relay = self.config.app.state.relay  # type: ignore[union-attr]
        for server in self.servers:
            server.close()  # no new socket may subscribe to a hub that is stopping
        if hasattr(relay, "hub"):
            await relay.hub.stop(1001)
            deadline = asyncio.get_running_loop().time() + SHUTDOWN_CLOSE_WAIT
            while relay.hub.all_subscribers() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
        for connection in list(self.server_state.connections):
            if isinstance(connection, WebSocketsSansIOProtocol):
                connection.transport.abort()
        await super().shutdown(sockets)
        self._captured_signals.clear()


class WithoutTraceback(logging.Filter):
    """Turns a logged traceback into the exception's name: while the database is down asyncpg's
    pool logs one for every failed reconnect, which buries the one line that matters."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.msg} ({type(record.exc_info[1]).__name__})"
            record.exc_info = None
        return True


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


def configure_logging(level: str) -> None:
    """RELAY_LOG_LEVEL applies to Relay's own loggers only: libraries stay at WARNING, since at
    DEBUG some (websockets, asyncpg) print the frames and queries that carry users' data."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("relay").setLevel(level)
    logging.getLogger("asyncpg.pool").addFilter(WithoutTraceback())


def serve(settings: Settings) -> None:
    configure_logging(settings.log_level)
    with database.database_dsn(settings) as dsn:
        asyncio.run(database.migrate(dsn))
        asyncio.run(check_keys(dsn, Vault(settings.key_encryption_keys)))
        config = uvicorn.Config(
            create_app(settings, dsn),
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http="httptools",
            ws="websockets-sansio",
            # One serialised message goes to many sockets: per-socket compression would redo the
            # work for every subscriber and keep zlib state (tens of KiB) per idle connection.
            ws_per_message_deflate=False,
            access_log=False,  # query strings can carry tokens
            log_level="warning",
            ws_ping_interval=settings.ws_ping_interval,
            ws_ping_timeout=settings.ws_ping_interval,
            timeout_graceful_shutdown=10,
        )
        print(banner(settings), flush=True)
        RelayServer(config).run()
