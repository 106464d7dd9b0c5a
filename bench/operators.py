"""Operator queries on a large log: first-page latency and plan of each filter, export memory.

    .venv/bin/python bench/operators.py --rows 1000000 --export-rows 100000

Loads synthetic rows (about 400-byte bodies, 100,000 predictions, a status mix like real
lifecycles, one row per 20 ms of received_at) into a scratch database on a throwaway embedded
Postgres (or DATABASE_URL's server), ANALYZEs, then prints one table row per filter: the plan's
access path and the time of the first page of 100 (best of 5); the full `EXPLAIN (ANALYZE,
BUFFERS)` of the one-hour window; and, for `relay export` runs (real CLI processes) of 0, N
and 10N rows, the time, rate and peak RSS of the process (from `wait4`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.core.filters import parse_filter
from service.db import embedded, migrations, store
from tests.support import relay_env

LOAD = """
INSERT INTO events (webhook_id, prediction_id, status, source, body, webhook_timestamp, received_at)
SELECT 'msg_' || n, 'p' || (n % 100000),
       CASE WHEN n % 8 = 0 THEN 'succeeded' WHEN n % 97 = 0 THEN 'failed'
            WHEN n % 8 = 1 THEN 'starting' ELSE 'processing' END,
       CASE WHEN n % 1000 = 0 THEN 'reconcile' ELSE 'webhook' END,
       convert_to('{"id":"p' || (n % 100000) || '","status":"processing","logs":"'
                  || repeat('x', 340) || '"}', 'UTF8'),
       timestamptz '2026-01-01Z' + n * interval '20 milliseconds',
       timestamptz '2026-01-01Z' + n * interval '20 milliseconds'
FROM generate_series($1::bigint, $2::bigint) AS n
"""


def filters(rows: int) -> list[tuple[str, dict[str, str]]]:
    hour_start = time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(1767225600 + rows * 0.02 / 2))
    hour_end = time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(1767225600 + rows * 0.02 / 2 + 3600))
    page_two = str(rows // 2 + 800)
    return [
        ("one prediction", {"prediction_id": "p4242"}),
        ("status=failed", {"status": "failed"}),
        ("source=reconcile", {"source": "reconcile"}),
        ("one hour (since/until)", {"since": hour_start, "until": hour_end}),
        ("seq range after/before", {"after": str(rows // 2), "before": str(rows // 2 + 5000)}),
        ("status + since", {"status": "succeeded", "since": hour_start}),
        ("status + since, next page", {"status": "succeeded", "since": hour_start, "after": page_two}),
        ("everything since the start", {"since": "2026-01-01T00:00:00Z"}),
    ]


async def load(conn: asyncpg.Connection, rows: int) -> float:
    started = time.perf_counter()
    step = 250_000
    for low in range(1, rows + 1, step):
        await conn.execute(LOAD, low, min(rows, low + step - 1))
    await conn.execute("VACUUM (ANALYZE) events")  # what autovacuum does to an insert-only table
    return time.perf_counter() - started


def first_page_sql(values: dict[str, str]) -> tuple[str, list]:
    where, args = parse_filter(values).where()
    return f"{store.select_where(where)} LIMIT 100", args


async def first_page(conn: asyncpg.Connection, values: dict[str, str]) -> tuple[str, float]:
    sql, args = first_page_sql(values)
    plan = [r[0] for r in await conn.fetch(f"EXPLAIN {sql}", *args)]
    scans = [line.strip().removeprefix("->").strip().split("  (")[0] for line in plan if "Scan" in line]
    access = "; ".join(scans) or plan[0]
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        await conn.fetch(sql, *args)
        best = min(best, time.perf_counter() - started)
    return access, best


async def explain_one_hour(conn: asyncpg.Connection, rows: int) -> list[str]:
    sql, args = first_page_sql(dict(filters(rows))["one hour (since/until)"])
    return [r[0] for r in await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)]


def export_process(dsn: str, rows: int) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of `relay export` writing the first `rows` rows to /dev/null."""
    argv = [sys.executable, "-m", "service", "export", "--quiet", "-o", os.devnull, "--before", str(rows + 1)]
    started = time.perf_counter()
    pid = os.posix_spawn(sys.executable, argv, relay_env(dsn))
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"relay export exited {os.waitstatus_to_exitcode(status)}")
    return elapsed, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


async def bench(dsn: str, rows: int, export_rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrations.migrate(conn)
        print(f"loaded {rows:,} rows in {await load(conn, rows):.1f} s\n")
        print("| filter | access path (EXPLAIN) | first page of 100 |")
        print("| --- | --- | --- |")
        for name, values in filters(rows):
            access, seconds = await first_page(conn, values)
            print(f"| {name} | {access} | {seconds * 1000:.2f} ms |")
        print("\nEXPLAIN (ANALYZE, BUFFERS), one hour (since/until), first page:\n")
        print("\n".join(await explain_one_hour(conn, rows)))
    finally:
        await conn.close()
    print("\n| `relay export` of | time | rows/s | peak RSS |")
    print("| ---: | ---: | ---: | ---: |")
    for count in (0, export_rows, min(rows, 10 * export_rows)):
        elapsed, peak = export_process(dsn, count)
        print(f"| {count:,} rows | {elapsed:.1f} s | {count / elapsed:,.0f} | {peak:.1f} MiB |")


async def scratch_database(admin_dsn: str) -> str:
    name = f"relay_bench_{os.getpid()}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return urlunsplit(urlsplit(admin_dsn)._replace(path="/" + name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--export-rows", type=int, default=100_000, help="N: exports 0, N and 10N rows")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        admin_dsn = os.environ.get("DATABASE_URL")
        if admin_dsn is None:
            server = embedded.start(Path(tmp), delete_on_exit=True)
            admin_dsn = embedded.dsn(server)
        dsn = asyncio.run(scratch_database(admin_dsn))
        asyncio.run(bench(dsn, options.rows, options.export_rows))


if __name__ == "__main__":
    main()
