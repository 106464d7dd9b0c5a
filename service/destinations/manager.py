"""Which instance sends which destination: each destination is held by one instance at a time,
through a session-level advisory lock on a connection of its own.

The same connection LISTENs for new events (the log's NOTIFY) and for changes to destinations,
so a sender needs nothing else from the process it runs in: `relay serve` runs one, and
`relay destinations run` runs one on its own (with `RELAY_DESTINATIONS=off` on the servers).

Postgres releases the lock when that connection ends, which happens at once when the holding
process dies (even `kill -9`: the kernel closes its socket), so another instance takes the
destination over on its next look (at most REFRESH seconds, or at once on a change). When the
lock connection is lost while the process lives, every courier stops before the lock could be
taken by another instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from service.core.settings import Settings
from service.db.database import Databases
from service.db.store import NOTIFY_CHANNEL
from service.db.vault import Vault
from service.destinations.courier import Courier
from service.destinations.model import CHANGES_CHANNEL

log = logging.getLogger("relay.destinations")

LOCK_CLASS = 0x5245  # first key of pg_try_advisory_lock(int, int); the second is hashtext(id)
REFRESH = 2.0
RECONNECT_DELAY = 1.0
RESTART_DELAY = 1.0


class Destinations:
    """Runs a courier for every destination this instance holds."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        vault: Vault,
        settings: Settings,
    ):
        self.pool, self.connect, self.vault = pool, connect, vault
        self.schedule = settings.retry_schedule
        self.concurrency = settings.destination_concurrency
        self.public = not settings.replay_private  # connect to global addresses only
        self.couriers: dict[str, tuple[Courier, asyncio.Task[None]]] = {}
        # Destinations whose courier stopped by itself (its secret cannot be read): not started
        # again, so the error is one line, until the destination changes.
        self.stopped: set[str] = set()
        self.look = asyncio.Event()

    def nudge(self) -> None:
        """New events were committed: wake every courier."""
        for courier, _ in self.couriers.values():
            courier.wake.set()

    async def run(self) -> None:
        while True:
            lost = asyncio.Event()
            try:
                conn = await self.connect()
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.warning("destinations: cannot connect (%s); retrying", type(exc).__name__)
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            try:
                await conn.add_listener(CHANGES_CHANNEL, self._changed)
                await conn.add_listener(NOTIFY_CHANNEL, self._committed)
                await self._hold(conn, lost)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("destinations: lost the lock connection (%s); stopping", type(exc).__name__)
            finally:
                await self._stop_all()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)
            await asyncio.sleep(RECONNECT_DELAY)

    def _committed(self, *_args: object) -> None:
        self.nudge()

    def _changed(self, _conn: object, _pid: int, _channel: str, destination_id: object) -> None:
        self.stopped.discard(str(destination_id))
        self.look.set()
        held = self.couriers.get(str(destination_id))
        if held is not None:
            held[0].changed()

    async def _hold(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        while not lost.is_set():
            ids = {r["id"] for r in await conn.fetch("SELECT id FROM destinations")}
            for destination_id in list(self.couriers):
                courier, task = self.couriers[destination_id]
                if destination_id not in ids or task.done():
                    await self._stop(destination_id)
                    await conn.execute(
                        "SELECT pg_advisory_unlock($1, hashtext($2))", LOCK_CLASS, destination_id
                    )
            self.stopped &= ids
            for destination_id in ids - set(self.couriers) - self.stopped:
                if await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1, hashtext($2))", LOCK_CLASS, destination_id
                ):
                    self._start(destination_id)
            self.look.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REFRESH):
                    await _first(self.look.wait(), lost.wait())

    def _start(self, destination_id: str) -> None:
        courier = Courier(
            self.pool, destination_id, self.vault, self.schedule, self.concurrency, public=self.public
        )
        task = asyncio.create_task(self._run_courier(courier), name=f"relay-destination-{destination_id}")
        self.couriers[destination_id] = (courier, task)

    async def _run_courier(self, courier: Courier) -> None:
        try:
            await courier.run()
            self.stopped.add(courier.id)  # it returned: removed, or its secret cannot be read
            self.look.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the database may be restarting; start again
            log.warning("destination %s stopped (%s); starting again", courier.id, type(exc).__name__)
            await asyncio.sleep(RESTART_DELAY)
            self.look.set()

    async def _stop(self, destination_id: str) -> None:
        _, task = self.couriers.pop(destination_id)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _stop_all(self) -> None:
        for destination_id in list(self.couriers):
            await self._stop(destination_id)


async def _first(*waits: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def run_standalone(dbs: Databases, vault: Vault, settings: Settings) -> None:
    """`relay destinations run`: the senders without an HTTP server, until cancelled. The lock
    and LISTEN connection goes to RELAY_LISTEN_DATABASE_URL (a transaction pooler cannot hold a
    session lock); the rest through DATABASE_URL."""
    pool = await asyncpg.create_pool(dbs.write, min_size=1, max_size=POOL_SIZE, **dbs.pool_options())
    try:
        await Destinations(pool, lambda: asyncpg.connect(dbs.listen), vault, settings).run()
    finally:
        await pool.close()


POOL_SIZE = 5
