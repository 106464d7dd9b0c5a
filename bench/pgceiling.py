"""The database's own ceiling on this machine: rows/s for single-row autocommit INSERTs from
many connections, and for 100-row batched INSERTs, into a table shaped like Relay's log; and the
latency of one commit (its WAL flush), the floor under any durable acknowledgement."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import asyncpg

SCHEMA = """
CREATE TABLE ceiling (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id text UNIQUE NOT NULL,
    body bytea NOT NULL
)
"""
INSERT_ONE = "INSERT INTO ceiling (webhook_id, body) VALUES ($1, $2)"
INSERT_MANY = "INSERT INTO ceiling (webhook_id, body) SELECT * FROM unnest($1::text[], $2::bytea[])"
BODY = os.urandom(1500)


async def rows_per_second(
    dsn: str, connections: int, seconds: float, write: Callable[[asyncpg.Connection, int], Awaitable[int]]
) -> float:
    """`connections` connections each calling `write(conn, index)` (which returns the rows it
    wrote) until `seconds` have passed; the rows written per second, all together."""
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    deadline = time.monotonic() + seconds
    counts = [0] * connections

    async def worker(index: int, conn: asyncpg.Connection) -> None:
        while time.monotonic() < deadline:
            counts[index] += await write(conn, index)

    started = time.monotonic()
    await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
    elapsed = time.monotonic() - started
    for conn in conns:
        await conn.close()
    return sum(counts) / elapsed


async def _insert_rate(dsn: str, connections: int, batch: int, seconds: float) -> float:
    written = [0] * connections

    async def write(conn: asyncpg.Connection, index: int) -> int:
        ids = [f"{batch}-{index}-{written[index] + i}" for i in range(batch)]
        if batch == 1:
            await conn.execute(INSERT_ONE, ids[0], BODY)
        else:
            await conn.execute(INSERT_MANY, ids, [BODY] * batch)
        written[index] += batch
        return batch

    return await rows_per_second(dsn, connections, seconds, write)


async def _commit_latencies_ms(dsn: str, seconds: float) -> list[float]:
    """One connection, one autocommit INSERT at a time, each timed: mostly the WAL flush."""
    conn = await asyncpg.connect(dsn)
    latencies, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        await conn.execute(INSERT_ONE, f"latency-{len(latencies)}", BODY)
        latencies.append((time.perf_counter() - started) * 1000)
    await conn.close()
    return sorted(latencies)


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(dsn: str, seconds: float) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    await conn.execute(SCHEMA)
    await conn.close()
    commits = await _commit_latencies_ms(dsn, seconds)
    return {
        "single": await _insert_rate(dsn, 32, 1, seconds),
        "batched": await _insert_rate(dsn, 4, 100, seconds),
        "commit_p50": percentile(commits, 0.5),
        "commit_p99": percentile(commits, 0.99),
        "commit_p999": percentile(commits, 0.999),
    }


def run(dsn: str, seconds: float) -> dict[str, float]:
    return asyncio.run(measure(dsn, seconds))
