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
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.supervisors import Multiprocess

from service.archive.stores import open_store
from service.core.settings import Settings, load_settings, worker_environment
from service.db import database
from service.db.vault import Vault, check_keys
from service.web.app import create_app
from service.web.logs import configure_logging
from service.web.transport import CoalescingHttpProtocol

log = logging.getLogger("relay")

SHUTDOWN_CLOSE_WAIT = 2.0
# Subscribers have nothing large to say (their messages are ignored): a bigger inbound message
# closes the socket with 1009 as soon as its frame header announces the size, before it is read.
WS_MAX_MESSAGE = 4096
WORKER_APP = "service.web.server:create_worker_app"


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


STALLED_CLOSE_WAIT = 5.0


class GoingAwayProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, closing with 1001 (going away) at shutdown, not 1012.

    `RelayServer` closes sockets before uvicorn does; `--workers` runs uvicorn's own server in
    each worker, and there this is what a browser sees when its worker stops.
    """

    def keepalive_timeout(self) -> None:
        """uvicorn sends a close frame and `close()`s the transport when a pong is late; but a
        peer that stopped reading has a full send buffer, which a closing transport waits to
        flush forever, and the app never hears of it (the probe found 20 such sockets still
        subscribed 110 s later). Such a peer is gone: drop the connection, so `connection_lost`
        tells the app and the socket is unsubscribed."""
        super().keepalive_timeout()
        self.transport.abort()

    async def send(self, message: Any) -> None:
        """A close for a peer that stopped reading waits at most STALLED_CLOSE_WAIT for room in
        the send buffer, then drops the connection; and a sent close frame that is never
        answered ends in a drop, not in a close that waits on an unread buffer."""
        closing = message["type"] == "websocket.close" and self.handshake_complete and not self.close_sent
        if closing and self.initial_response is None and not self.writable.is_set():
            try:
                async with asyncio.timeout(STALLED_CLOSE_WAIT):
                    await self.writable.wait()
            except TimeoutError:
                self.close_sent = True
                self.transport.abort()
                return
        await super().send(message)
        if closing and self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)

    def shutdown(self) -> None:
        if not self.handshake_complete or self.close_sent:
            super().shutdown()
            return
        self.stop_keepalive()
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1001})
        self.conn.send_close(1001)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()


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


def uvicorn_config(app: Starlette | str, settings: Settings, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=CoalescingHttpProtocol,  # httptools, one write() per loop pass (transport.py)
        ws=GoingAwayProtocol,
        # One serialised message goes to many sockets: per-socket compression would redo the
        # work for every subscriber and keep zlib state (tens of KiB) per idle connection.
        ws_per_message_deflate=False,
        # Relay configures logging itself (web/logs.py): uvicorn must neither install its own
        # handlers nor reset the levels; the access log redacts tokens from query strings.
        log_config=None,
        log_level=None,
        access_log=settings.access_log,
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_interval,
        ws_max_size=WS_MAX_MESSAGE,
        # uvicorn's request-head limit (h11's); Relay's httptools protocol enforces the same
        # value itself (transport.py), since httptools has no limit of its own.
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=10,
        **options,
    )


def serve(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format, settings.access_log)
    with database.database_dsn(settings, supervise=True) as dsn:
        asyncio.run(database.require_writable(dsn))
        asyncio.run(database.migrate(dsn))
        asyncio.run(check_keys(dsn, Vault(settings.key_encryption_keys)))
        open_store(settings.archive)  # a clear ConfigError now, not a failed start-up later
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
    settings = load_settings(generate_missing=False)
    configure_logging(settings.log_level, settings.log_format, settings.access_log)
    return create_app(settings, str(settings.database_url))
