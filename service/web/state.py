"""What handlers share: settings and the per-process resources built in the lifespan.

It lives apart from the app module (which imports every route) so that routes can name its
type: handlers reach it only through `relay_of(request)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
from starlette.requests import HTTPConnection

from service.archive.stores import ArchiveStore
from service.batches.links import link_key
from service.batches.scheduler import Scheduler
from service.core.hosts import HostPolicy
from service.core.settings import Settings
from service.core.supervisor import Supervisor
from service.db.database import Databases
from service.db.vault import Vault
from service.ingest.committer import GroupCommitter
from service.live.hub import Hub
from service.ops.replay_jobs import ReplayJobs
from service.upstream.client import Upstream

CONNECT_TIMEOUT = 5.0


@dataclass
class Relay:
    """What handlers share: settings and the per-process resources built in the lifespan."""

    settings: Settings
    databases: Databases
    pool: asyncpg.Pool = field(init=False)
    read_pool: asyncpg.Pool = field(init=False)  # the pool itself unless RELAY_READ_DATABASE_URL is set
    committer: GroupCommitter = field(init=False)
    hub: Hub = field(init=False)
    webhook_keys: tuple[bytes, ...] = field(init=False)
    vault: Vault = field(init=False)
    upstream: Upstream | None = field(init=False, default=None)
    # Every background loop runs under it: a crash is logged and turns /readyz to 503.
    supervisor: Supervisor = field(init=False, default_factory=Supervisor)
    archive_store: ArchiveStore | None = field(init=False, default=None)  # None: RELAY_ARCHIVE=off
    archive_policy: HostPolicy = field(init=False)
    scheduler: Scheduler | None = field(init=False, default=None)  # batches, with an upstream
    batch_link_key: bytes = field(init=False)
    replays: ReplayJobs = field(init=False)  # built with the pools

    def __post_init__(self) -> None:
        self.webhook_keys = self.settings.webhook_keys
        self.vault = Vault(self.settings.key_encryption_keys)
        self.batch_link_key = link_key(self.settings.subscribe_key or "")
        self.archive_policy = HostPolicy(self.settings.archive_hosts)

    async def listen_connection(self) -> asyncpg.Connection:
        """The hub's LISTEN connection: RELAY_LISTEN_DATABASE_URL, direct or session-pooled."""
        return await asyncpg.connect(self.databases.listen, timeout=CONNECT_TIMEOUT)


def relay_of(connection: HTTPConnection) -> Relay:
    """The process's shared state, from any request or WebSocket of this app."""
    relay = connection.app.state.relay
    assert isinstance(relay, Relay)
    return relay
