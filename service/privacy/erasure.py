"""Forgetting a prediction by crypto-shredding, and re-wrapping data keys under a new key.

`DELETE /admin/predictions/{id}` and `relay forget` append one `erasure` event through the
normal append path (so seq, NOTIFY and fan-out hold); `vault.seal` deletes the prediction's data
key in that same transaction. The erasure's webhook id is derived from the prediction id, so a
second forget is an ordinary duplicate: harmless, and it reports the first erasure's seq.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import asyncpg

from service.core.errors import ConfigError, NotFound, RelayError, error_class
from service.db import database, migrations, store
from service.db.connection import Connection
from service.db.store import Appended, Delivery
from service.db.vault import ERASED_BODY, ERASURE_SOURCE, Vault

EncryptionOff = error_class("EncryptionOff", 409, "ENCRYPTION_OFF")
NotErasable = error_class("NotErasable", 409, "NOT_ERASABLE")

ENCRYPTION_OFF = (
    "RELAY_ENCRYPTION_KEY is not set, so payloads are stored in clear in an append-only log and "
    "nothing can be erased; set a key to make new predictions erasable"
)

PLAN_QUERY = """
SELECT p.status,
       EXISTS (SELECT 1 FROM events WHERE webhook_id = $2) AS erased,
       EXISTS (SELECT 1 FROM events WHERE prediction_id = $1 AND NOT encrypted) AS has_clear
FROM predictions p WHERE p.prediction_id = $1
"""


def erasure_id(prediction_id: str) -> str:
    return f"erasure_{prediction_id}"


async def plan_erasure(conn: Connection, vault: Vault, prediction_id: str) -> Delivery:
    """The erasure event to append for a prediction, or an error saying why it cannot be."""
    if not vault.enabled:
        raise EncryptionOff(ENCRYPTION_OFF)
    row = await conn.fetchrow(PLAN_QUERY, prediction_id, erasure_id(prediction_id))
    if row is None:
        raise NotFound(f"no events stored for prediction {prediction_id!r}")
    if row["has_clear"] and not row["erased"]:
        raise NotErasable(
            f"prediction {prediction_id!r} has events stored in clear (before encryption was turned "
            "on); they cannot be erased from the append-only log"
        )
    return Delivery(
        webhook_id=erasure_id(prediction_id),
        prediction_id=prediction_id,
        status=row["status"],  # the erasure keeps the prediction's status as it stands
        source=ERASURE_SOURCE,
        body=ERASED_BODY,
        received_at=datetime.now(UTC),
    )


def forgotten(prediction_id: str, appended: Appended) -> dict[str, object]:
    return {"id": prediction_id, "erased": True, "seq": appended.seq, "already_erased": appended.duplicate}


async def ready_connection(dsn: str, vault: Vault, *, name: str = "DATABASE_URL") -> asyncpg.Connection:
    """A connection to a migrated database whose data keys this vault can open; `name` is the
    variable its DSN came from, for the error line."""
    conn = await database.connect(dsn, name=name)
    try:
        if await migrations.pending(conn):
            raise ConfigError("the database is not migrated yet; run relay migrate")
        await vault.check(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


async def forget_all(dsn: str, vault: Vault, prediction_ids: list[str]) -> int:
    conn = await ready_connection(dsn, vault)
    failures = 0
    try:
        for prediction_id in prediction_ids:
            try:
                async with conn.transaction():
                    delivery = await plan_erasure(conn, vault, prediction_id)
                    [appended] = await store.append(conn, [delivery], vault.seal)
            except RelayError as error:
                print(f"relay: cannot forget {prediction_id}: {error.message}", file=sys.stderr)
                failures += 1
                continue
            state = "was already forgotten" if appended.duplicate else "forgotten"
            print(f"{prediction_id}: {state} (erasure event seq {appended.seq})")
    finally:
        await conn.close()
    return 2 if failures else 0


async def rotate(dsn: str, vault: Vault) -> int:
    conn = await ready_connection(dsn, vault)
    try:
        return await vault.rotate(
            conn, lambda done, total: print(f"re-wrapped {done}/{total} data keys", flush=True)
        )
    finally:
        await conn.close()
