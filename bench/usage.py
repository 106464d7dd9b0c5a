"""How long `/admin/usage` takes on a log of ~10 million events, and its plan.

Usage:  .venv/bin/python bench/usage.py [--predictions 1700000]

The report reads only the `predictions` projection (one row per prediction), so the bench fills
that table directly: 1.7 million predictions ≈ 10 million events at Replicate's ~6 deliveries per
prediction, spread evenly over 90 days, 8 models, 90 % terminal. It then times the report for a
day, a week and a 30-day month, grouped by model and by day, and the budget check's spend query,
and prints the plan of the month.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.usage import report as usage  # noqa: E402
from tests.support import Postgres  # noqa: E402

FILL = """
INSERT INTO predictions (prediction_id, status, status_rank, state_seq, first_seq, last_seq,
                         event_count, model, predict_time, first_received_at, updated_at)
SELECT 'p' || i,
       CASE WHEN i % 10 = 0 THEN 'processing' WHEN i % 17 = 0 THEN 'failed' ELSE 'succeeded' END,
       CASE WHEN i % 10 = 0 THEN 2 ELSE 3 END,
       i * 6, i * 6 - 5, i * 6, 6, 'owner/model-' || (i % 8),
       CASE WHEN i % 10 = 0 THEN NULL ELSE 1 + (i % 97) / 10.0 END,
       at, at + interval '6 seconds'
FROM generate_series(1, $1) AS i,
     LATERAL (SELECT $2::timestamptz + (i * ($3 / $1::float8)) * interval '1 second' AS at) AS t
"""
START = datetime(2025, 1, 1, tzinfo=UTC)
DAYS = 90


async def run(dsn: str, predictions: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        await conn.execute(FILL, predictions, START, float(DAYS * 86400))
        await conn.execute("VACUUM ANALYZE predictions")
        print(f"filled {predictions:,} predictions in {time.perf_counter() - started:.1f} s")
        prices = {f"owner/model-{i}": 0.001 for i in range(7)}  # one model unpriced
        print("\n| window | group | predictions counted | ms (best of 3) |")
        print("| --- | --- | ---: | ---: |")
        for days in (1, 7, 30):
            for group in ("model", "day"):
                since = START + timedelta(days=30)
                when = usage.Period(since, since + timedelta(days=days), group)
                best, report = float("inf"), None
                for _ in range(3):
                    t0 = time.perf_counter()
                    report = await usage.report(conn, when, prices)
                    best = min(best, time.perf_counter() - t0)
                print(f"| {days} d | {group} | {report['total']['started']:,} | {best * 1000:,.0f} |")
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            await usage.month_spend(conn, prices, START + timedelta(days=45))
            best = min(best, time.perf_counter() - t0)
        print(f"| calendar month 2025-02 | budget check (spend only) | - | {best * 1000:,.0f} |")
        since = START + timedelta(days=30)
        plan = await conn.fetch(
            "EXPLAIN (ANALYZE, BUFFERS) " + usage.usage_sql("model"), since, since + timedelta(days=30)
        )
        print("\nplan, 30 days grouped by model:\n")
        print("\n".join("    " + row[0] for row in plan))
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=int, default=1_700_000)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        postgres = Postgres(Path(tmp))
        asyncio.run(run(postgres.new_database(), options.predictions))


if __name__ == "__main__":
    main()
