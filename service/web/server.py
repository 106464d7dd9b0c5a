"""`relay serve`: database, migrations, the start-up banner, then uvicorn (one or N workers)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from pathlib import Path

from starlette.applications import Starlette

from service.archive.stores import open_store
from service.core.errors import ConfigError
from service.core.settings import Settings, load_settings, worker_environment
from service.db import database
from service.db.vault import Vault, check_keys
from service.web.app import create_app
from service.web.logs import configure_logging
from service.web.uvicorn_internals import RelayServer, run_workers, uvicorn_config

log = logging.getLogger("relay")

WORKER_APP = "service.web.server:create_worker_app"


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
    configure_logging(settings.log_level, settings.log_format, settings.access_log)
    with database.database_dsn(settings, supervise=True) as dsn:
        asyncio.run(database.require_writable(dsn))
        asyncio.run(database.migrate(dsn))
        asyncio.run(check_keys(dsn, Vault(settings.key_encryption_keys)))
        open_store(settings.archive)  # a clear ConfigError now, not a failed start-up later
        check_address(settings.host, settings.port)  # before the banner says "listening"
        print(banner(settings), flush=True)
        if settings.workers > 1:
            serve_workers(settings, dsn)
        else:
            RelayServer(uvicorn_config(create_app(settings, dsn), settings)).run()


def check_address(host: str, port: int) -> None:
    """One line, exit 2, when Relay cannot listen where it is told to (a port in use, a host that
    is not this machine's), instead of a banner announcing it followed by uvicorn's exit 3."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as error:  # socket.gaierror: a name that does not resolve
        raise ConfigError(
            f"cannot listen on RELAY_HOST {host[:100]!r} ({error.strerror}); "
            "give an address of this machine, such as 127.0.0.1 or 0.0.0.0"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            fix = (
                "stop what holds that port, or choose another RELAY_PORT (--port)"
                if error.errno == errno.EADDRINUSE
                else "give RELAY_HOST (--host) an address of this machine, and a port it may use"
            )
            raise ConfigError(f"cannot listen on {host[:100]}:{port} ({error.strerror}); {fix}") from None


def serve_workers(settings: Settings, dsn: str) -> None:
    """N processes on one listening socket and one database (the embedded one is started once,
    here). Workers build their app from the environment; metrics merge through files."""
    metrics_dir = settings.metrics_dir or settings.data_dir.resolve() / "metrics"
    clear_metrics(metrics_dir)
    os.environ.update(worker_environment(settings, dsn, metrics_dir))
    config = uvicorn_config(WORKER_APP, settings, factory=True, workers=settings.workers)
    run_workers(config)


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
