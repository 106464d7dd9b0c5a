"""The event log and its per-prediction projection: batch insert and reads.

Every insert runs under one transaction-level advisory lock, so `seq` values are assigned and
made visible in the same order: a reader that has seen seq N never later finds a smaller one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from service.core.statuses import rank
from service.db.connection import Connection

SEQ_LOCK = 0x52454C4153  # serialises the commits that assign seq
NOTIFY_CHANNEL = "relay_events"
REPLAY_CHANNEL = "relay_replay"  # payload: comma-separated seqs to re-send, marked replayed

# The wrapped data key of an encrypted row's prediction (null once it is forgotten), so that
# `events.open_body` can decrypt any row read with these columns from `events`.
DATA_KEY_COLUMN = (
    "CASE WHEN events.encrypted THEN (SELECT k.wrapped FROM data_keys k"
    " WHERE k.prediction_id = events.prediction_id) END AS data_key"
)
EVENT_COLUMNS = (
    "seq, webhook_id, prediction_id, status, source, body, encrypted, webhook_timestamp, received_at, "
    + DATA_KEY_COLUMN
)

# sql/030_append_batch.sql: lock, insert, duplicates, projection and notify in one statement.
APPEND = """
SELECT seq, duplicate
FROM relay_append($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::bool[],
                  $7::timestamptz[], $8::timestamptz[], $9::int2[], $10::text[], $11::float8[],
                  $12, $13)
ORDER BY ord
"""


@dataclass(frozen=True)
class Delivery:
    """One event ready to append: verified, parsed, and its body prepared for storage."""

    webhook_id: str
    prediction_id: str
    status: str
    source: str
    body: bytes
    received_at: datetime
    webhook_timestamp: datetime | None = None
    encrypted: bool = False
    model: str | None = None
    predict_time: float | None = None


@dataclass(frozen=True)
class Appended:
    seq: int
    duplicate: bool


Prepare = Callable[[Connection, list[Delivery]], Awaitable[list[Delivery]]]


async def append(
    conn: Connection, deliveries: Sequence[Delivery], prepare: Prepare | None = None
) -> list[Appended]:
    """Append a batch atomically; outside a transaction it is committed when this returns.
    Results follow input order.

    A `webhook_id` already in the log (or earlier in the batch) adds no row and reports the
    first row's seq with `duplicate=True`. `prepare` (the vault's `seal`) maps the batch one to
    one onto the rows to store, inside the transaction and under the seq lock.
    """
    if prepare is None:
        return await _append_statement(conn, deliveries)
    async with conn.transaction():
        # relay_append takes the same lock again (re-entrant): taken here, it also covers
        # `prepare`, so a data key is created and used in seq order.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SEQ_LOCK)
        return await _append_statement(conn, await prepare(conn, list(deliveries)))


async def _append_statement(conn: Connection, deliveries: Sequence[Delivery]) -> list[Appended]:
    rows = await conn.fetch(
        APPEND,
        [d.webhook_id for d in deliveries],
        [d.prediction_id for d in deliveries],
        [d.status for d in deliveries],
        [d.source for d in deliveries],
        [d.body for d in deliveries],
        [d.encrypted for d in deliveries],
        [d.webhook_timestamp for d in deliveries],
        [d.received_at for d in deliveries],
        [int(rank(d.status)) for d in deliveries],
        [d.model for d in deliveries],
        [d.predict_time for d in deliveries],
        SEQ_LOCK,
        NOTIFY_CHANNEL,
    )
    return [Appended(r["seq"], r["duplicate"]) for r in rows]


async def max_seq(conn: Connection) -> int:
    seq: int = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events")
    return seq


async def fetch_events(
    conn: Connection,
    *,
    prediction_id: str | None = None,
    after: int = 0,
    up_to: int | None = None,
    limit: int = 500,
) -> list[asyncpg.Record]:
    """Events with `after < seq <= up_to`, in seq order, optionally for one prediction."""
    clauses: list[str] = ["seq > $1"]
    args: list[object] = [after]
    if up_to is not None:
        args.append(up_to)
        clauses.append(f"seq <= ${len(args)}")
    if prediction_id is not None:
        args.append(prediction_id)
        clauses.append(f"prediction_id = ${len(args)}")
    return await fetch_where(conn, " AND ".join(clauses), args, limit)


async def fetch_seqs(
    conn: Connection, seqs: Sequence[int], after: int = 0, limit: int = 500
) -> list[asyncpg.Record]:
    """A page (rows and bytes bounded) of the events with these seqs past `after`, in seq order."""
    return await fetch_where(conn, "seq = ANY($1::int8[]) AND seq > $2", [list(seqs), after], limit)


def select_where(where: str) -> str:
    """The events matching a parameterised WHERE clause, in seq order."""
    return f"SELECT {EVENT_COLUMNS} FROM events WHERE {where} ORDER BY seq"


# The most body bytes one page carries (beyond its first row, which always comes): a page of
# 1,000 events of 4 MiB each would otherwise be 4 GiB in memory at once. `next_after` continues.
PAGE_BYTES = 8 * 1024 * 1024


def sized_page(inner: str, order: str, budget: str) -> str:
    """`inner` (rows with a `size` column, already limited) cut where the running total of
    `size`, in `order`, passes `budget`: every row whose predecessors hold less than the budget.
    `page_rows` is how many rows `inner` had, so a caller can tell a cut page from the end."""
    return (
        "SELECT * FROM (SELECT page.*, sum(page.size) OVER (ORDER BY "
        f"{order} ROWS UNBOUNDED PRECEDING) AS running, count(*) OVER () AS page_rows FROM ({inner}) AS page)"
        f" AS sized WHERE running - size < {budget} ORDER BY {order}"
    )


async def fetch_where(
    conn: Connection, where: str, args: Sequence[Any], limit: int, max_bytes: int = PAGE_BYTES
) -> list[asyncpg.Record]:
    """At most `limit` matching events in seq order, and no more than `max_bytes` of bodies after
    the first (octet_length reads a stored body's size without fetching or decompressing it)."""
    n = len(args)
    inner = (
        f"SELECT {EVENT_COLUMNS}, octet_length(body) AS size FROM events WHERE {where}"
        f" ORDER BY seq LIMIT ${n + 1}"
    )
    return await conn.fetch(sized_page(inner, "seq", f"${n + 2}"), *args, limit, max_bytes)


def page_may_continue(rows: Sequence[asyncpg.Record], limit: int) -> bool:
    """Whether more rows may follow a page from `fetch_where`: it was full, or cut by bytes."""
    return bool(rows) and (len(rows) >= limit or len(rows) < rows[0]["page_rows"])


PREDICTION_STATE = (
    "SELECT p.prediction_id, p.status, p.last_seq, p.event_count, p.state_seq AS seq, p.model,"
    f" events.webhook_id, events.body, events.encrypted, {DATA_KEY_COLUMN}"
    " FROM predictions p JOIN events ON events.seq = p.state_seq"
)


async def fetch_prediction(conn: Connection, prediction_id: str) -> asyncpg.Record | None:
    """The projection row plus the body of the event that defines the current state."""
    return await conn.fetchrow(f"{PREDICTION_STATE} WHERE p.prediction_id = $1", prediction_id)


# The projection's most recent rows, with each state body's size and its rank, for `sized_page`.
RECENT_STATES = PREDICTION_STATE.replace(
    " FROM predictions p",
    ", octet_length(events.body) AS size, row_number() OVER (ORDER BY p.updated_at DESC) AS ord"
    " FROM predictions p",
)


async def fetch_recent_predictions(
    conn: Connection, limit: int, max_bytes: int = PAGE_BYTES
) -> list[asyncpg.Record]:
    """The most recently updated predictions, in the shape of `fetch_prediction`: at most
    `limit`, and fewer when their state bodies would pass `max_bytes` (the first always comes)."""
    inner = f"{RECENT_STATES} ORDER BY p.updated_at DESC LIMIT $1"
    return await conn.fetch(sized_page(inner, "ord", "$2"), limit, max_bytes)


# Consecutive events of one status form a run (gaps and islands): a late `processing` after
# `succeeded` is a run of its own, as it was delivered.
STATUS_RUNS = """
SELECT prediction_id, status, min(seq) AS seq, count(*) AS events, min(received_at) AS received_at
FROM (
    SELECT prediction_id, status, seq, received_at,
           row_number() OVER (PARTITION BY prediction_id ORDER BY seq)
         - row_number() OVER (PARTITION BY prediction_id, status ORDER BY seq) AS run
    FROM events WHERE prediction_id = ANY($1::text[])
) numbered
GROUP BY prediction_id, status, run
ORDER BY prediction_id, min(seq)
"""


async def fetch_status_runs(conn: Connection, prediction_ids: list[str]) -> list[asyncpg.Record]:
    """Each prediction's timeline: runs of consecutive events with the same status, in seq order."""
    return await conn.fetch(STATUS_RUNS, prediction_ids)


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None
