"""Reaching the database: DATABASE_URL, or the embedded server in the data dir."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import asyncpg

from service.core.errors import ConfigError
from service.core.settings import Settings
from service.db import embedded, migrations
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


async def connect(dsn: str) -> asyncpg.Connection:
    """A connection, or a one-line ConfigError that names the problem without the DSN."""
    try:
        return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    except asyncpg.InvalidPasswordError:
        raise ConfigError("the database refused the credentials in DATABASE_URL") from None
    except asyncpg.InvalidCatalogNameError:
        raise ConfigError("the database named in DATABASE_URL does not exist; create it") from None
    except (TimeoutError, OSError, asyncpg.PostgresError, ValueError) as exc:
        raise ConfigError(
            f"cannot connect to the database ({type(exc).__name__}); "
            "is the server in DATABASE_URL running and reachable?"
        ) from None


async def migrate(dsn: str) -> list[str]:
    conn = await connect(dsn)
    try:
        return await migrations.migrate(conn)
    except asyncpg.InsufficientPrivilegeError as error:
        raise ConfigError(
            f"migrations are pending and the role in DATABASE_URL may not apply them ({error.message}); "
            "run `relay migrate` as the role that owns Relay's tables (README: database roles)"
        ) from None
    finally:
        await conn.close()


class HeldConnection:
    """One pool connection kept between uses by a hot loop (the writer, the fan-out reader):
    handing it back after every use would cost the pool's reset round trip each time."""

    def __init__(self, pool: asyncpg.Pool, timeout: float):
        self._pool = pool
        self._timeout = timeout
        self._conn: asyncpg.Connection | None = None

    @contextlib.asynccontextmanager
    async def use(self, keep_on: tuple[type[Exception], ...] = ()) -> AsyncIterator[asyncpg.Connection]:
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
