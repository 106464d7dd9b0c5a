"""`relay retention`: retire whole months of the log, never editing a row.

Each monthly partition that ended before `now - keep` is exported first (the `relay export`
format, one file per month, written to a temporary name, flushed to disk, then renamed), and only
then detached and dropped, in one transaction. A run that stops half-way leaves every partition
either still in the log or already exported; running it again finishes the job.

A prediction whose current-state event was retired leaves the projection too (the projection is
not the log: it is derived from it and is the one table retention changes). `webhook_ids` keeps
every id, so a very late retry of a retired delivery is still answered as a duplicate.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg

from service.core.errors import ConfigError
from service.core.filters import EventFilter
from service.db.connection import Connection
from service.db.partitions import Partition, monthly_partitions
from service.db.vault import Vault
from service.ops.export import export

DURATION = re.compile(r"([0-9]+)([smhdw])")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Longer than any log, and short enough that `now - keep` stays a date Python can represent.
MAX_KEEP_DAYS = 365_000
OWNER_NEEDED = (
    "relay retention detaches and drops partitions of the log: run it with DATABASE_URL naming "
    "the role that owns Relay's tables (the one that runs relay migrate)"
)


def parse_duration(text: str) -> timedelta:
    """`90d`, `12w`, `36h`…: how much of the log to keep."""
    found = DURATION.fullmatch(text.strip())
    if found is None or not found[1].strip("0"):
        raise ConfigError(f"--keep must be a positive duration like 90d, 12w or 48h, got {text[:40]!r}")
    # Digits counted first: int() refuses a string of thousands of digits with a traceback.
    seconds = int(found[1]) * UNITS[found[2]] if len(found[1]) <= 15 else math.inf
    if seconds > MAX_KEEP_DAYS * UNITS["d"]:
        raise ConfigError(f"--keep must be at most {MAX_KEEP_DAYS}d (1,000 years), got {text[:40]!r}")
    return timedelta(seconds=int(seconds))


@dataclass(frozen=True)
class Retired:
    partition: Partition
    events: int
    kept_at: str | None  # where its export is kept (a path, or an s3:// URL)


# Takes a month's export, durable on local disk, to where it is kept and says where; raising
# stops the run before that month is dropped.
Keeper = Callable[[Path], Awaitable[str]]


async def keep_in_place(file: Path) -> str:
    return str(file)


def due(partitions: list[Partition], now: datetime, keep: timedelta) -> list[Partition]:
    """The partitions wholly older than the kept window, oldest first."""
    return [p for p in partitions if p.end <= now - keep]


async def export_partition(conn: Connection, partition: Partition, path: Path, vault: Vault) -> int:
    """Write one month with `relay export`'s own writer; durable on disk before this returns."""
    temporary = path.with_name(path.name + ".partial")
    with temporary.open("w", encoding="utf-8") as out:
        count = await export(conn, EventFilter(since=partition.start, until=partition.end), out, vault)
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(path)
    return count


async def count_rows(conn: Connection, partition: Partition) -> int:
    rows: int = await conn.fetchval(f'SELECT count(*) FROM "{partition.name}"')
    return rows


async def drop(conn: Connection, partition: Partition) -> None:
    """Detach and drop one partition, and the projection rows whose state was in it."""
    async with conn.transaction():
        bounds = await conn.fetchrow(f'SELECT min(seq) AS low, max(seq) AS high FROM "{partition.name}"')
        assert bounds is not None  # an aggregate without GROUP BY yields one row
        await conn.execute(f'ALTER TABLE events DETACH PARTITION "{partition.name}"')
        await conn.execute(f'DROP TABLE "{partition.name}"')
        if bounds["low"] is not None:
            await conn.execute(
                "DELETE FROM predictions WHERE state_seq BETWEEN $1 AND $2", bounds["low"], bounds["high"]
            )


async def retire(
    conn: Connection,
    *,
    keep: timedelta,
    now: datetime,
    vault: Vault,
    archive_to: Path | None,
    keeper: Keeper = keep_in_place,
    dry_run: bool = False,
    report: Callable[[Retired], None] = lambda r: None,
) -> list[Retired]:
    """Export (when asked: into `archive_to`, then handed to `keeper`) and drop every partition
    that ended before `now - keep`."""
    retired = []
    for partition in due(await monthly_partitions(conn), now, keep):
        kept_at = None
        if archive_to is not None and not dry_run:
            file = archive_to / f"{partition.name}.jsonl"
            events = await export_partition(conn, partition, file, vault)
            kept_at = await keeper(file)
        else:
            events = await count_rows(conn, partition)
        if not dry_run:
            try:
                await drop(conn, partition)
            except asyncpg.InsufficientPrivilegeError:
                raise ConfigError(OWNER_NEEDED) from None
        done = Retired(partition, events, kept_at)
        report(done)
        retired.append(done)
    return retired
