"""Reaching the database: DATABASE_URL, or the embedded server in the data dir."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from service.core.errors import ConfigError
from service.core.settings import Settings
from service.db import embedded, migrations
from service.db.connection import Connection
from service.db.supervisor import PostmasterSupervisor

CONNECT_TIMEOUT = 5.0


@contextlib.contextmanager
def database_dsn(settings: Settings, *, supervise: bool = False) -> Iterator[str]:
    """The DSN to use; starts (or joins) the embedded server when DATABASE_URL is unset.
    With `supervise` (`relay serve`), a dead embedded postmaster is restarted (supervisor.py)."""
    if settings.database_url is not None:
        yield str(settings.database_url)
        return
    server = embedded.start(settings.data_dir)
    if not supervise:
        yield embedded.dsn(server)
        return
    supervisor = PostmasterSupervisor(server)
    supervisor.start()
    try:
        yield embedded.dsn(server)
    finally:
        supervisor.stop()


@dataclass(frozen=True)
class Databases:
    """The DSNs of one Relay process: appends (and everything that must not lag) go to `write`,
    LISTEN to `listen` (a pooler in transaction mode cannot carry it), reads that may lag behind
    the primary to `read`. `pooled` turns off asyncpg's prepared-statement cache, which a
    transaction pooler breaks (a statement prepared on one server connection, used on another)."""

    write: str
    listen: str
    read: str
    pooled: bool = False

    def pool_options(self) -> dict[str, Any]:
        return {"statement_cache_size": 0} if self.pooled else {}


def databases(settings: Settings, dsn: str) -> Databases:
    """`dsn` is DATABASE_URL or the embedded server's; the others default to it."""
    return Databases(
        write=dsn,
        listen=str(settings.listen_database_url or dsn),
        read=str(settings.read_database_url or dsn),
        pooled=settings.database_pooler == "transaction",
    )


READ_ONLY_QUERY = "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'"
READ_ONLY = (
    "the database in DATABASE_URL is read-only (a standby, or read-only mode): Relay appends to "
    "its log there; point DATABASE_URL at the primary (a standby can serve RELAY_READ_DATABASE_URL)"
)


async def read_only_reason(conn: Connection) -> str | None:
    """Why this connection cannot take Relay's writes, or None when it can."""
    return READ_ONLY if await conn.fetchval(READ_ONLY_QUERY) else None


async def require_writable(dsn: str) -> None:
    """A one-line ConfigError, before anything else, when DATABASE_URL cannot be written."""
    conn = await connect(dsn)
    try:
        reason = await read_only_reason(conn)
    finally:
        await conn.close()
    if reason is not None:
        raise ConfigError(reason)


async def connect(dsn: str, *, name: str = "DATABASE_URL") -> asyncpg.Connection:
    """A connection, or a one-line ConfigError that names the problem without the DSN.

    For one command's work: without asyncpg's statement cache, which gains a short-lived
    connection nothing and breaks behind a transaction pooler (PgBouncer), whatever the setting.
    """
    try:
        return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT, statement_cache_size=0)
    except asyncpg.TargetServerAttributeNotMatched:
        raise ConfigError(
            f"the server in {name} does not match its target_session_attrs (a standby for "
            "read-write?); point DATABASE_URL at the primary"
        ) from None
    except asyncpg.InvalidPasswordError:
        raise ConfigError(f"the database refused the credentials in {name}") from None
    except asyncpg.InvalidCatalogNameError:
        raise ConfigError(f"the database named in {name} does not exist; create it") from None
    except (TimeoutError, OSError, asyncpg.PostgresError, ValueError) as exc:
        raise ConfigError(
            f"cannot connect to the database ({type(exc).__name__}); "
            f"is the server in {name} running and reachable?"
        ) from None


async def migrate(dsn: str) -> list[str]:
    conn = await connect(dsn)
    try:
        return await migrations.migrate(conn)
    except asyncpg.InsufficientPrivilegeError as error:
        raise ConfigError(
            f"migrations are pending and the role in DATABASE_URL may not apply them ({error.message}); "
            "run `relay migrate` as the role that owns Relay's tables (docs/reliability.md: database roles)"
        ) from None
    except asyncpg.ReadOnlySQLTransactionError:
        raise ConfigError(READ_ONLY) from None
    finally:
        await conn.close()


class HeldConnection:
    """One pool connection kept between uses by a hot loop (the writer, the fan-out reader):
    handing it back after every use would cost the pool's reset round trip each time."""

    def __init__(self, pool: asyncpg.Pool, timeout: float):
        self._pool = pool
        self._timeout = timeout
        self._conn: PoolConnectionProxy | None = None

    @contextlib.asynccontextmanager
    async def use(self, keep_on: tuple[type[Exception], ...] = ()) -> AsyncIterator[Connection]:
        """The held connection; after an error other than `keep_on` it is handed back, since it
        may be broken (the pool replaces broken connections), and the next use takes a fresh one."""
        if self._conn is None:
            self._conn = await self._pool.acquire(timeout=self._timeout)
        try:
            yield self._conn
        except keep_on:
            raise
        except BaseException:
            await self.release()
            raise

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self._pool.release(conn, timeout=self._timeout)
