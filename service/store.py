"""The event log and its per-prediction projection: batch insert and reads.

Every insert runs under one transaction-level advisory lock, so `seq` values are assigned and
made visible in the same order: a reader that has seen seq N never later finds a smaller one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from .statuses import Rank, rank, supersedes

SEQ_LOCK = 0x52454C4153  # serialises the commits that assign seq
NOTIFY_CHANNEL = "relay_events"

EVENT_COLUMNS = (
    "seq, webhook_id, prediction_id, status, source, body, encrypted, webhook_timestamp, received_at"
)

INSERT_EVENTS = """
INSERT INTO events (webhook_id, prediction_id, status, source, body, encrypted,
                    webhook_timestamp, received_at)
SELECT w, p, s, src, b, enc, wt, ra
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::bool[],
            $7::timestamptz[], $8::timestamptz[])
     WITH ORDINALITY AS t(w, p, s, src, b, enc, wt, ra, ord)
ORDER BY ord
ON CONFLICT (webhook_id) DO NOTHING
RETURNING seq, webhook_id
"""

# The forward-only rule of statuses.supersedes, applied against the stored state.
UPSERT_PROJECTION = """
INSERT INTO predictions AS p (prediction_id, status, status_rank, state_seq, first_seq, last_seq,
                              event_count, model, predict_time, first_received_at, updated_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::int2[], $4::int8[], $5::int8[], $6::int8[],
                     $7::int8[], $8::text[], $9::float8[], $10::timestamptz[], $10::timestamptz[])
ON CONFLICT (prediction_id) DO UPDATE SET
    status = CASE WHEN wins THEN excluded.status ELSE p.status END,
    status_rank = CASE WHEN wins THEN excluded.status_rank ELSE p.status_rank END,
    state_seq = CASE WHEN wins THEN excluded.state_seq ELSE p.state_seq END,
    predict_time = CASE WHEN wins THEN excluded.predict_time ELSE p.predict_time END,
    model = coalesce(p.model, excluded.model),
    last_seq = greatest(p.last_seq, excluded.last_seq),
    event_count = p.event_count + excluded.event_count,
    updated_at = excluded.updated_at
"""
UPSERT_PROJECTION = UPSERT_PROJECTION.replace(
    "wins",
    "(excluded.status_rank > p.status_rank OR (excluded.status_rank = p.status_rank AND p.status_rank < 3))",
)
# The projection change and the fan-out nudge (the newest seq, never a payload) in one round trip.
UPSERT_PROJECTION_AND_NOTIFY = f"WITH projection AS ({UPSERT_PROJECTION}) SELECT pg_notify($11, $12)"


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


@dataclass
class _ProjectionChange:
    delivery: Delivery
    seq: int
    rank: Rank
    first_seq: int
    last_seq: int
    count: int = 1


def _fold_projection(rows: Sequence[tuple[int, Delivery]]) -> list[_ProjectionChange]:
    """One change per prediction for a batch, folding its events with the forward-only rule."""
    changes: dict[str, _ProjectionChange] = {}
    for seq, delivery in rows:
        new_rank = rank(delivery.status)
        change = changes.get(delivery.prediction_id)
        if change is None:
            changes[delivery.prediction_id] = _ProjectionChange(delivery, seq, new_rank, seq, seq)
            continue
        change.count += 1
        change.last_seq = seq
        if supersedes(new_rank, change.rank):
            change.delivery, change.seq, change.rank = delivery, seq, new_rank
        elif change.delivery.model is None and delivery.model is not None:
            change.delivery = _with_model(change.delivery, delivery.model)
    return list(changes.values())


def _with_model(delivery: Delivery, model: str) -> Delivery:
    return Delivery(**{**delivery.__dict__, "model": model})


async def _upsert_projection(
    conn: asyncpg.Connection, changes: list[_ProjectionChange], newest_seq: int
) -> None:
    await conn.execute(
        UPSERT_PROJECTION_AND_NOTIFY,
        [c.delivery.prediction_id for c in changes],
        [c.delivery.status for c in changes],
        [int(c.rank) for c in changes],
        [c.seq for c in changes],
        [c.first_seq for c in changes],
        [c.last_seq for c in changes],
        [c.count for c in changes],
        [c.delivery.model for c in changes],
        [c.delivery.predict_time for c in changes],
        [c.delivery.received_at for c in changes],
        NOTIFY_CHANNEL,
        str(newest_seq),
    )


async def append(conn: asyncpg.Connection, deliveries: Sequence[Delivery]) -> list[Appended]:
    """Append a batch in one transaction; the caller commits. Results follow input order.

    A `webhook_id` already in the log (or earlier in the batch) adds no row and reports the
    first row's seq with `duplicate=True`.
    """
    await conn.execute("SELECT pg_advisory_xact_lock($1)", SEQ_LOCK)
    unique: dict[str, Delivery] = {}
    for delivery in deliveries:
        unique.setdefault(delivery.webhook_id, delivery)
    batch = list(unique.values())
    inserted = await conn.fetch(
        INSERT_EVENTS,
        [d.webhook_id for d in batch],
        [d.prediction_id for d in batch],
        [d.status for d in batch],
        [d.source for d in batch],
        [d.body for d in batch],
        [d.encrypted for d in batch],
        [d.webhook_timestamp for d in batch],
        [d.received_at for d in batch],
    )
    new_seqs = {r["webhook_id"]: r["seq"] for r in inserted}
    old_seqs = await _existing_seqs(conn, [w for w in unique if w not in new_seqs])
    if new_seqs:
        rows = sorted((seq, unique[w]) for w, seq in new_seqs.items())
        await _upsert_projection(conn, _fold_projection(rows), rows[-1][0])
    return _results(deliveries, new_seqs, old_seqs)


async def _existing_seqs(conn: asyncpg.Connection, webhook_ids: list[str]) -> dict[str, int]:
    if not webhook_ids:
        return {}
    rows = await conn.fetch(
        "SELECT webhook_id, seq FROM events WHERE webhook_id = ANY($1::text[])", webhook_ids
    )
    return {r["webhook_id"]: r["seq"] for r in rows}


def _results(
    deliveries: Sequence[Delivery], new_seqs: dict[str, int], old_seqs: dict[str, int]
) -> list[Appended]:
    results, seen = [], set()
    for d in deliveries:
        if d.webhook_id in new_seqs and d.webhook_id not in seen:
            results.append(Appended(new_seqs[d.webhook_id], duplicate=False))
        else:
            seq = new_seqs.get(d.webhook_id) or old_seqs[d.webhook_id]
            results.append(Appended(seq, duplicate=True))
        seen.add(d.webhook_id)
    return results


async def max_seq(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events")


async def fetch_events(
    conn: asyncpg.Connection,
    *,
    prediction_id: str | None = None,
    after: int = 0,
    up_to: int | None = None,
    limit: int = 500,
) -> list[asyncpg.Record]:
    """Events with `after < seq <= up_to`, in seq order, optionally for one prediction."""
    clauses, args = ["seq > $1"], [after]
    if up_to is not None:
        args.append(up_to)
        clauses.append(f"seq <= ${len(args)}")
    if prediction_id is not None:
        args.append(prediction_id)
        clauses.append(f"prediction_id = ${len(args)}")
    args.append(limit)
    sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(clauses)} ORDER BY seq LIMIT ${len(args)}"
    return await conn.fetch(sql, *args)


async def fetch_prediction(conn: asyncpg.Connection, prediction_id: str) -> asyncpg.Record | None:
    """The projection row plus the body of the event that defines the current state."""
    return await conn.fetchrow(
        "SELECT p.prediction_id, p.status, p.last_seq, p.event_count, p.state_seq AS seq,"
        " e.webhook_id, e.body, e.encrypted"
        " FROM predictions p JOIN events e ON e.seq = p.state_seq"
        " WHERE p.prediction_id = $1",
        prediction_id,
    )


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


def decode_body(body: bytes) -> Any:
    return json.loads(body)
