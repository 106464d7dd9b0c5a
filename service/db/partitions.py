"""The log's monthly partitions (sql/100_partitioned_log.sql): kept ahead, listed for retention.

Rows land in the partition of their `received_at` month (UTC). A month without a partition would
put its rows in `events_default`, which retention never drops, so the service makes partitions
for the coming months at start and once a day.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from service.core.months import next_month
from service.db.connection import Connection

log = logging.getLogger("relay.partitions")

AHEAD = "3 months"
INTERVAL = 24 * 3600.0
NAME = re.compile(r"events_(\d{4})_(\d{2})")

PARTITIONS = """
SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'events'::regclass
"""


@dataclass(frozen=True)
class Partition:
    """One month of the log: rows with `start <= received_at < end`."""

    name: str
    start: datetime
    end: datetime


def partition_named(name: str) -> Partition | None:
    """The month a partition covers, from its name; None for `events_default`."""
    found = NAME.fullmatch(name)
    if found is None:
        return None
    start = datetime(int(found[1]), int(found[2]), 1, tzinfo=UTC)
    return Partition(name, start, next_month(start))


async def monthly_partitions(conn: Connection) -> list[Partition]:
    """The log's monthly partitions, oldest first (the default partition is not one)."""
    names = [row["name"] for row in await conn.fetch(PARTITIONS)]
    return sorted(filter(None, map(partition_named, names)), key=lambda p: p.start)


async def create_ahead(conn: Connection) -> int:
    """Partitions from this month to AHEAD from now; how many were missing."""
    made: int = await conn.fetchval(f"SELECT relay_create_partitions(now(), now() + interval '{AHEAD}')")
    return made


async def keep_ahead(pool: asyncpg.Pool, interval: float = INTERVAL) -> None:
    """The service's daily check; a failure is logged and retried the next day (rows still
    land, in the default partition, so ingest never depends on it)."""
    while True:
        try:
            async with pool.acquire() as conn:
                made = await create_ahead(conn)
            if made:
                log.info("created %d monthly partition(s) of the log", made)
        except (OSError, asyncpg.PostgresError) as error:
            log.warning("could not create the log's coming partitions (%s); retrying in a day", error)
        await asyncio.sleep(interval)
