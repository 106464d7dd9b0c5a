"""The operators' event filter: parsing, what it matches in Postgres, and that indexes serve it."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from service.core.errors import InvalidRequest
from service.core.filters import EventFilter, parse_filter
from service.db import store

ROWS = 40_000
BASE = datetime(2026, 11, 20, tzinfo=UTC)
# Generated rows: prediction p<n % 4000>, mostly processing, one minute apart in received_at.
GENERATE = f"""
INSERT INTO events (webhook_id, prediction_id, status, source, body, webhook_timestamp, received_at)
SELECT 'msg_' || n, 'p' || (n % 4000),
       CASE WHEN n % 10 = 0 THEN 'succeeded' WHEN n % 10 = 1 THEN 'starting' ELSE 'processing' END,
       CASE WHEN n % 500 = 0 THEN 'reconcile' ELSE 'webhook' END,
       convert_to('{{"id":"p' || (n % 4000) || '"}}', 'UTF8'), NULL,
       timestamptz '{BASE.isoformat()}' + n * interval '1 minute'
FROM generate_series(1, {ROWS}) AS n
"""


def test_parse_reads_every_filter():
    found = parse_filter(
        {
            "prediction_id": "p1",
            "status": "succeeded",
            "source": "reconcile",
            "since": "2026-11-20T10:00:00Z",
            "until": "2026-11-20T12:00:00+01:00",
            "after": "5",
            "before": "90",
        }
    )
    assert found == EventFilter(
        prediction_id="p1",
        status="succeeded",
        source="reconcile",
        since=datetime(2026, 11, 20, 10, tzinfo=UTC),
        until=datetime(2026, 11, 20, 11, tzinfo=UTC),
        after=5,
        before=90,
    )
    assert parse_filter({"since": "2026-11-20T10:00:00"}).since == datetime(2026, 11, 20, 10, tzinfo=UTC)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"prediction": "p1"}, "unknown filter 'prediction'"),
        ({"since": "yesterday"}, "since must be an ISO 8601 time"),
        ({"until": "2026-13-01"}, "until must be an ISO 8601 time"),
        ({"after": "-1"}, "after must be a non-negative integer"),
        ({"before": "ten"}, "before must be a non-negative integer"),
        ({"source": "carrier-pigeon"}, "source must be one of webhook, reconcile, erasure"),
        ({"status": ""}, "status must be a non-empty string"),
        ({"prediction_id": "a\x00b"}, "prediction_id must be a non-empty string"),
        ({"since": "2026-11-21T00:00:00Z", "until": "2026-11-20T00:00:00Z"}, "since must be earlier"),
    ],
)
def test_bad_filter_values_are_refused_with_the_name(values, message):
    with pytest.raises(InvalidRequest) as refused:
        parse_filter(values)
    assert message in refused.value.message


def test_where_clause_holds_no_values():
    """Filter values travel as parameters, never inside the SQL text."""
    where, args = parse_filter({"prediction_id": "x' OR '1'='1", "after": "3"}).where()
    assert "x' OR" not in where and args == [3, "x' OR '1'='1"]
    where, args = parse_filter({"since": "2026-11-20T10:00:00Z"}).where()
    assert "2026" not in where and args[1] == args[2] == datetime(2026, 11, 20, 10, tzinfo=UTC)


async def _with_log(dsn: str, work):
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(GENERATE)
        await conn.execute("ANALYZE events")
        return await work(conn)
    finally:
        await conn.close()


def expected(event_filter: EventFilter) -> list[int]:
    """The same filter applied in Python to the generated rows."""
    seqs = []
    for n in range(1, ROWS + 1):
        status = "succeeded" if n % 10 == 0 else "starting" if n % 10 == 1 else "processing"
        row = {
            "seq": n,
            "prediction_id": f"p{n % 4000}",
            "status": status,
            "source": "reconcile" if n % 500 == 0 else "webhook",
            "received_at": BASE + timedelta(minutes=n),
        }
        f = event_filter
        if (
            n > f.after
            and (f.before is None or n < f.before)
            and f.prediction_id in (None, row["prediction_id"])
            and f.status in (None, row["status"])
            and f.source in (None, row["source"])
            and (f.since is None or row["received_at"] >= f.since)
            and (f.until is None or row["received_at"] < f.until)
        ):
            seqs.append(n)
    return seqs


FILTERS = [
    {"prediction_id": "p17"},
    {"status": "starting", "after": "30000"},
    {"source": "reconcile"},
    {"since": "2026-11-30T00:00:00Z", "until": "2026-11-30T06:00:00Z"},
    {"after": "1000", "before": "1200"},
    {"source": "webhook", "since": "2026-12-15T00:00:00Z"},
    {"since": "2026-12-01T00:00:00Z", "after": "20000"},
    {"prediction_id": "p20", "status": "succeeded", "since": "2026-11-21T00:00:00Z"},
]


def test_each_filter_matches_exactly_and_uses_an_index(dsn):
    """On a log large enough for the planner to care, every filter is served by an index."""

    async def check(conn: asyncpg.Connection) -> None:
        for values in FILTERS:
            event_filter = parse_filter(values)
            where, args = event_filter.where()
            rows = await store.fetch_where(conn, where, args, ROWS)
            assert [r["seq"] for r in rows] == expected(event_filter), values
            plan = "\n".join(
                r[0] for r in await conn.fetch(f"EXPLAIN {store.select_where(where)} LIMIT 100", *args)
            )
            # The log is partitioned by month: a partition with no rows (one made ahead for the
            # coming months) costs nothing to scan; every partition holding rows uses an index.
            scanned = re.findall(r"Seq Scan on (\w+)", plan)
            populated = [name for name in scanned if await conn.fetchval(f'SELECT count(*) FROM "{name}"')]
            assert "Index" in plan and not populated, (values, plan)

    asyncio.run(_with_log(dsn, check))
