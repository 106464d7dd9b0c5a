"""The cache's SQL (sql/090_api_surface.sql): remember opted-in creates, find a reusable answer.

A create with `"cache": true` is remembered under its key when it is made; whether it may answer
a later identical request is decided at read time from the log's projection: it must have
succeeded, within RELAY_CACHE_TTL of its terminal time, and not have been forgotten (an erasure
also deletes its rows, by trigger). So nothing has to be told when a prediction ends or fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from service.db.events import open_body
from service.db.store import EVENT_COLUMNS
from service.db.vault import ERASURE_SOURCE, Vault

REMEMBER = """
INSERT INTO prediction_cache (scope, target, input_sha256, prediction_id) VALUES ($1, $2, $3, $4)
ON CONFLICT DO NOTHING
"""

# The newest succeeded candidate within the TTL, and the event holding its current state.
FIND = f"""
WITH hit AS (
    SELECT p.state_seq, p.model AS hit_model, p.predict_time AS hit_predict_time
    FROM prediction_cache c JOIN predictions p ON p.prediction_id = c.prediction_id
    WHERE c.scope = $1 AND c.target = $2 AND c.input_sha256 = $3
      AND p.status = 'succeeded' AND p.terminal_at >= now() - make_interval(secs => $4)
      AND NOT EXISTS (SELECT 1 FROM events e
                      WHERE e.prediction_id = c.prediction_id AND e.source = '{ERASURE_SOURCE}')
    ORDER BY p.terminal_at DESC
    LIMIT 1
)
SELECT hit_model, hit_predict_time, {EVENT_COLUMNS} FROM hit JOIN events ON events.seq = hit.state_seq
"""

ANSWERED = """
INSERT INTO cache_answers (scope, prediction_id, model, predict_time) VALUES ($1, $2, $3, $4)
"""


@dataclass(frozen=True)
class CacheKey:
    scope: str
    target: str
    input_sha256: str


@dataclass(frozen=True)
class Hit:
    prediction_id: str
    prediction: dict[str, Any]


def pointing_at_copies(prediction: dict[str, Any], copies: Mapping[str, str]) -> dict[str, Any]:
    """The prediction with each output URL that has a stored copy replaced by the copy's URL
    (`copies`: Replicate URL -> Relay `/files/<sha256>` URL), wherever it sits in `output`."""

    def swap(value: Any) -> Any:
        if isinstance(value, str):
            return copies.get(value, value)
        if isinstance(value, list):
            return [swap(item) for item in value]
        if isinstance(value, dict):
            return {key: swap(item) for key, item in value.items()}
        return value

    if not copies or "output" not in prediction:
        return prediction
    return {**prediction, "output": swap(prediction["output"])}


async def remember(pool: asyncpg.Pool, key: CacheKey, prediction_id: str) -> None:
    async with pool.acquire() as conn:
        await conn.execute(REMEMBER, key.scope, key.target, key.input_sha256, prediction_id)


async def find(pool: asyncpg.Pool, vault: Vault, key: CacheKey, ttl: int) -> Hit | None:
    """The prediction that may answer `key`, recorded as one cached answer; None on a miss."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(FIND, key.scope, key.target, key.input_sha256, float(ttl))
        if row is None:
            return None
        prediction = open_body(row, vault)
        if not isinstance(prediction, dict) or prediction.get("status") != "succeeded":
            return None  # erased or unreadable content never answers
        await conn.execute(
            ANSWERED, key.scope, row["prediction_id"], row["hit_model"], row["hit_predict_time"]
        )
    return Hit(row["prediction_id"], prediction)
