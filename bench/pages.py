"""What bounding event pages by bytes costs: the byte-bounded page query against a plain LIMIT.

Usage:  .venv/bin/python bench/pages.py [--events 100000] [--body 1000]

Fills a throwaway database's log with `--events` events of `--body` bytes each (through the real
append), then times, best of 20, the shapes Relay reads: an `/admin/events` page (1000 rows),
a per-prediction page, and the hub's read past its cursor (100 new rows), each as
`store.fetch_where` runs it (rows plus the running byte total, cut at PAGE_BYTES) and as the
plain `ORDER BY seq LIMIT n` it replaced. Prints one table; fails when the bounded query costs
more than CEILING times the plain one plus SLACK_MS (the window functions add a fixed ~0.2 ms,
which dominates reads of a few rows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.db import store  # noqa: E402
from tests.support import Postgres  # noqa: E402

CEILING = 2.0
SLACK_MS = 0.5
BATCH = 1000


async def fill(conn: asyncpg.Connection, events: int, body_size: int) -> None:
    pad = "x" * max(0, body_size - 60)
    for start in range(0, events, BATCH):
        deliveries = [
            store.Delivery(
                webhook_id=f"msg_{i}",
                prediction_id=f"p{i // 6}",
                status="processing",
                source="webhook",
                body=json.dumps({"id": f"p{i // 6}", "status": "processing", "logs": pad}).encode(),
                received_at=datetime.now(UTC),
            )
            for i in range(start, min(events, start + BATCH))
        ]
        await store.append(conn, deliveries)
    await conn.execute("VACUUM ANALYZE events")


async def best_ms(run: object, repeat: int = 20) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        await run()  # type: ignore[operator]
        best = min(best, time.perf_counter() - started)
    return best * 1000


async def measure(dsn: str, events: int, body_size: int) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        await fill(conn, events, body_size)
        head = await store.max_seq(conn)
        shapes = [
            ("/admin/events page, 1000 rows", "seq > $1", [0], 1000),
            ("per-prediction page", "seq > $1 AND prediction_id = $2", [0, "p42"], 1000),
            ("hub read past its cursor, 100 rows", "seq > $1", [head - 100], 1000),
        ]
        print(f"\n{events:,} events of {body_size} bytes\n")
        print("| read | plain LIMIT ms | byte-bounded ms | ratio |")
        print("| --- | ---: | ---: | ---: |")
        ok = True
        for name, where, args, limit in shapes:
            plain_sql = f"{store.select_where(where)} LIMIT ${len(args) + 1}"
            plain = await best_ms(lambda: conn.fetch(plain_sql, *args, limit))  # noqa: B023
            bounded = await best_ms(lambda: store.fetch_where(conn, where, args, limit))  # noqa: B023
            ratio = bounded / plain
            ok = ok and bounded <= CEILING * plain + SLACK_MS
            print(f"| {name} | {plain:.2f} | {bounded:.2f} | {ratio:.2f} |")
        verdict = "ok" if ok else "EXCEEDED"
        print(f"\nceiling: byte-bounded <= {CEILING}x plain + {SLACK_MS} ms: {verdict}")
        return ok
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--body", type=int, default=1000, help="bytes per event body")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dsn = Postgres(Path(tmp), own=True).new_database()
        ok = asyncio.run(measure(dsn, options.events, options.body))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
