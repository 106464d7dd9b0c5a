"""Who created each prediction: `prediction_owners` (sql/050_owners.sql).

An owner is the hash of the API key that created the prediction (never the key itself), or
`ADMIN` for the admin token. Recording is idempotent: the first owner recorded stays.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

ADMIN = "admin"

RECORD = """
INSERT INTO prediction_owners (prediction_id, owner) VALUES ($1, $2)
ON CONFLICT (prediction_id) DO NOTHING
"""


async def record_owner(conn: asyncpg.Connection | asyncpg.Pool, prediction_id: str, owner: str) -> None:
    """Remember that `owner` created `prediction_id` (a prediction already owned keeps its owner)."""
    await conn.execute(RECORD, prediction_id, owner)


async def owner_of(conn: asyncpg.Connection | asyncpg.Pool, prediction_id: str) -> str | None:
    """The prediction's owner, or None when Relay did not record one."""
    owner: str | None = await conn.fetchval(
        "SELECT owner FROM prediction_owners WHERE prediction_id = $1", prediction_id
    )
    return owner


async def owned_among(
    conn: asyncpg.Connection | asyncpg.Pool, owner: str, prediction_ids: Sequence[str]
) -> set[str]:
    """Those of `prediction_ids` that `owner` created (one query, for a list page)."""
    rows = await conn.fetch(
        "SELECT prediction_id FROM prediction_owners WHERE owner = $1 AND prediction_id = ANY($2::text[])",
        owner,
        list(prediction_ids),
    )
    return {row["prediction_id"] for row in rows}


def may_see(caller: str, owner: str | None) -> bool:
    """The admin sees every prediction; an API key only those it created."""
    return caller == ADMIN or (owner is not None and owner == caller)
