"""The batches' SQL: creating a batch, reading it, binding predictions to items, cancel requests.

Scheduling itself (claiming items under the batch's row lock) is in `scheduler.py`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg

from service.batches.links import ItemRef
from service.batches.requests import BatchRequest
from service.core import crypto
from service.db.connection import Connection
from service.db.store import DATA_KEY_COLUMN, select_where
from service.db.vault import Vault

OPEN_STATUSES = ("pending", "creating", "submitted")
TERMINAL_STATUSES = ("succeeded", "failed", "canceled", "aborted")
UNKNOWN_OUTCOME = "CREATE_OUTCOME_UNKNOWN"

# What users see for an item: its own status until a prediction exists, then the prediction's
# (from the log's projection), so `starting`/`processing` show while it runs.
VIEW_STATUS = (
    "CASE WHEN i.status = 'submitted' THEN coalesce(p.status, 'starting')"
    " WHEN i.status = 'creating' AND p.status IS NOT NULL THEN p.status ELSE i.status END"
)

INSERT_BATCH = """
INSERT INTO batches (id, owner, path, target, events_filter, concurrency, total)
VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7)
RETURNING *
"""
INSERT_ITEMS = """
INSERT INTO batch_items (batch_id, index, input, input_sealed, kek_id)
SELECT $1, n.i - 1, n.input::jsonb, n.sealed, $4
FROM unnest($2::text[], $3::bytea[]) WITH ORDINALITY AS n(input, sealed, i)
"""
# Every `input = NULL` of an item goes with this: the input is dropped in either form.
DROP_INPUT = "input = NULL, input_sealed = NULL, kek_id = NULL"


class InputUnreadable(Exception):
    """A sealed input whose key-encryption key is no longer configured."""


def new_batch_id() -> str:
    return "b_" + uuid.uuid4().hex


def input_owner(batch_id: str, index: int) -> str:
    """What a sealed input is bound to: it opens for its own item only."""
    return f"{batch_id}#{index}"


def stored_inputs(vault: Vault, batch_id: str, inputs: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    """The items' inputs as stored: JSON text in clear, or sealed when encryption is on."""
    texts = [json.dumps(values) for values in inputs]
    if not vault.enabled:
        return texts, [None] * len(texts)
    sealed = [vault.seal_secret(text, input_owner(batch_id, n))[0] for n, text in enumerate(texts)]
    return [None] * len(texts), sealed


def open_input(vault: Vault, batch_id: str, row: asyncpg.Record) -> Any:
    """A claimed item's input, opened if sealed; InputUnreadable when its key is gone."""
    if row["input_sealed"] is None:
        return json.loads(row["input"])
    return json.loads(_opened(vault, batch_id, row))


def _opened(vault: Vault, batch_id: str, row: asyncpg.Record) -> str:
    try:
        return vault.open_secret(row["input_sealed"], row["kek_id"], input_owner(batch_id, row["index"]))
    except crypto.Unreadable as error:
        raise InputUnreadable(str(error)) from None


WAITING_SEALED = """
SELECT batch_id, index, input_sealed, kek_id FROM batch_items
WHERE input_sealed IS NOT NULL AND kek_id <> $1
LIMIT $2
"""
RESEAL = """
UPDATE batch_items i SET input_sealed = n.sealed, kek_id = $5
FROM unnest($1::text[], $2::int[], $3::text[], $4::bytea[]) AS n(batch_id, index, kek_id, sealed)
WHERE i.batch_id = n.batch_id AND i.index = n.index AND i.kek_id = n.kek_id AND i.input_sealed IS NOT NULL
"""
RESEAL_PAGE = 1000


async def reseal_inputs(conn: Connection, vault: Vault) -> int:
    """Seal every waiting input again under the current key (`relay rotate-keys`), so that the
    old key can leave RELAY_ENCRYPTION_KEY while batches still run. Returns the count."""
    done = 0
    while rows := await conn.fetch(WAITING_SEALED, vault.current_id, RESEAL_PAGE):
        sealed = [
            vault.seal_secret(_opened(vault, r["batch_id"], r), input_owner(r["batch_id"], r["index"]))[0]
            for r in rows
        ]
        columns = ([r["batch_id"] for r in rows], [r["index"] for r in rows], [r["kek_id"] for r in rows])
        await conn.execute(RESEAL, *columns, sealed, vault.current_id)
        done += len(rows)
    return done


async def insert_batch(conn: Connection, owner: str, request: BatchRequest, vault: Vault) -> asyncpg.Record:
    """The batch and all its items, in one transaction: either all is stored or nothing."""
    batch_id = new_batch_id()
    clear, sealed = stored_inputs(vault, batch_id, request.inputs)
    async with conn.transaction():
        row = await conn.fetchrow(
            INSERT_BATCH,
            batch_id,
            owner,
            request.path,
            json.dumps(request.target),
            request.events_filter,
            request.concurrency,
            len(request.inputs),
        )
        assert row is not None  # INSERT … RETURNING returns the row
        await conn.execute(INSERT_ITEMS, batch_id, clear, sealed, vault.current_id)
    return row


async def fetch_batch(conn: Connection, batch_id: str, owner: str | None) -> asyncpg.Record | None:
    """The batch, if it exists and `owner` may see it (None: the admin, who sees every batch)."""
    return await conn.fetchrow(
        "SELECT * FROM batches WHERE id = $1 AND ($2::text IS NULL OR owner = $2)", batch_id, owner
    )


async def list_batches(conn: Connection, owner: str | None, limit: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT * FROM batches WHERE $1::text IS NULL OR owner = $1 ORDER BY created_at DESC LIMIT $2",
        owner,
        limit,
    )
    return rows


async def counts(conn: Connection, batch_ids: list[str]) -> dict[str, dict[str, int]]:
    """Items by status, per batch."""
    rows = await conn.fetch(
        f"""SELECT i.batch_id, {VIEW_STATUS} AS status, count(*) AS n
            FROM batch_items i LEFT JOIN predictions p ON p.prediction_id = i.prediction_id
            WHERE i.batch_id = ANY($1::text[]) GROUP BY 1, 2""",
        batch_ids,
    )
    found: dict[str, dict[str, int]] = {batch_id: {} for batch_id in batch_ids}
    for row in rows:
        found[row["batch_id"]][row["status"]] = row["n"]
    return found


ITEMS_PAGE = f"""
SELECT i.index, {VIEW_STATUS} AS status, i.prediction_id, i.error, i.error_code,
       events.seq, events.webhook_id, events.body, events.encrypted, {DATA_KEY_COLUMN}
FROM batch_items i
LEFT JOIN predictions p ON p.prediction_id = i.prediction_id
LEFT JOIN events ON events.seq = p.state_seq
WHERE i.batch_id = $1 AND i.index > $2
ORDER BY i.index
LIMIT $3
"""


async def items_page(conn: Connection, batch_id: str, after: int, limit: int) -> list[asyncpg.Record]:
    """Items with `index > after`, each with the body of its prediction's current state, if any."""
    rows: list[asyncpg.Record] = await conn.fetch(ITEMS_PAGE, batch_id, after, limit)
    return rows


# A delivery names its item: the prediction is bound to it if nothing was yet (the create's
# answer was lost, or has not arrived). An item given up as of unknown outcome takes it back.
BIND = f"""
UPDATE batch_items SET prediction_id = $3, {DROP_INPUT},
    status = CASE WHEN status IN ('creating', 'failed') THEN 'submitted' ELSE status END,
    error = CASE WHEN status = 'failed' THEN NULL ELSE error END,
    error_code = CASE WHEN status = 'failed' THEN NULL ELSE error_code END
WHERE batch_id = $1 AND index = $2 AND prediction_id IS NULL
  AND (status = 'creating' OR (status = 'failed' AND error_code = $4))
RETURNING (SELECT owner FROM batches WHERE id = $1)
"""


async def bind(conn: Connection, ref: ItemRef, prediction_id: str) -> str | None:
    """Bind the prediction to the item if it had none; the batch's owner when it was bound now."""
    # A prediction id can belong to one item only (unique index): a replayed or forged pairing
    # with another item is ignored, never an error for Replicate's delivery.
    try:
        owner: str | None = await conn.fetchval(BIND, ref.batch_id, ref.index, prediction_id, UNKNOWN_OUTCOME)
    except asyncpg.UniqueViolationError:
        return None
    return owner


async def owners_table(conn: Connection) -> bool:
    """Whether `prediction_owners` (sql/050_owners.sql) exists, so item predictions get owners."""
    return bool(await conn.fetchval("SELECT to_regclass('prediction_owners') IS NOT NULL"))


async def record_owner(conn: Connection, prediction_id: str, owner: str) -> None:
    """The batch's owner owns each of its predictions (another key gets 404 for them)."""
    await conn.execute(
        "INSERT INTO prediction_owners (prediction_id, owner) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        prediction_id,
        owner,
    )


async def request_cancel(conn: Connection, batch_id: str) -> str:
    """'canceling' when this call canceled the batch, else why not: 'canceled' (already) or 'ended'."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT status, cancel_requested FROM batches WHERE id = $1 FOR UPDATE", batch_id
        )
        if row is None:
            return "ended"  # the caller has just read it: batches are never deleted
        if row["cancel_requested"] or row["status"] == "canceled":
            return "canceled"
        if row["status"] != "running":
            return "ended"
        await conn.execute("UPDATE batches SET cancel_requested = true WHERE id = $1", batch_id)
        await conn.execute(
            f"UPDATE batch_items SET status = 'canceled', {DROP_INPUT}, ended_at = now()"
            " WHERE batch_id = $1 AND status = 'pending'",
            batch_id,
        )
    return "canceling"


async def is_member(conn: Connection, batch_id: str, prediction_id: str) -> bool:
    found = await conn.fetchval(
        "SELECT batch_id = $1 FROM batch_items WHERE prediction_id = $2", batch_id, prediction_id
    )
    return bool(found)


async def end_seq(conn: Connection, batch_id: str) -> int | None:
    """None while an item is unfinished; once every item has ended (its own status, or its
    prediction's in the log, is terminal), the seq of the batch's last event (0 if none)."""
    final: int | None = await conn.fetchval(
        """SELECT CASE WHEN bool_and(i.status <> ALL($2::text[]) OR coalesce(p.status_rank, 0) = 3)
                       THEN coalesce(max(p.last_seq), 0) END
           FROM batch_items i LEFT JOIN predictions p ON p.prediction_id = i.prediction_id
           WHERE i.batch_id = $1""",
        batch_id,
        list(OPEN_STATUSES),
    )
    return final


BATCH_EVENTS_WHERE = (
    "seq > $1 AND seq <= $2 AND prediction_id IN"
    " (SELECT prediction_id FROM batch_items WHERE batch_id = $3 AND prediction_id IS NOT NULL)"
)


async def batch_events(
    conn: Connection, batch_id: str, after: int, up_to: int, limit: int
) -> list[asyncpg.Record]:
    """The events of the batch's predictions in (after, up_to], in seq order."""
    where = select_where(BATCH_EVENTS_WHERE)
    rows: list[asyncpg.Record] = await conn.fetch(f"{where} LIMIT $4", after, up_to, batch_id, limit)
    return rows


def batch_fields(row: asyncpg.Record, item_counts: dict[str, int]) -> dict[str, Any]:
    """A batch as the API shows it (without `relay` and `items`, which the caller adds)."""
    hold = None
    if row["status"] == "running" and row["hold_reason"]:
        until = row["hold_until"]
        hold = {"reason": row["hold_reason"], "until": until.isoformat() if until else None}
    return {
        "id": row["id"],
        "status": row["status"],
        **json.loads(row["target"]),
        "total": row["total"],
        "concurrency": row["concurrency"],
        "counts": item_counts,
        "cancel_requested": row["cancel_requested"],
        "held": hold,
        "created_at": row["created_at"].isoformat(),
        "ended_at": row["ended_at"].isoformat() if row["ended_at"] else None,
    }
