"""Which model a bare version id belongs to, learned from Replicate's own answers.

Replicate's prediction objects name both `model` (`owner/name`) and `version` (a bare id). Each
answer to a create or get made through Relay teaches the mapping, kept in `model_versions`
(shared by instances, kept across restarts), so that a later create naming only that bare id is
validated like one naming the model. An id Relay has never seen is not guessed at: its input
passes through unchecked, as for any model Relay has no schema for.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from service.core.validation import MODEL_NAME, VERSION_ID

LEARN = """
INSERT INTO model_versions (version_id, model) VALUES ($1, $2)
ON CONFLICT (version_id) DO NOTHING
"""


def mapping_in(prediction: Any) -> tuple[str, str] | None:
    """(version id, model) when a prediction object names both in their plain forms."""
    if not isinstance(prediction, dict):
        return None
    version, model = prediction.get("version"), prediction.get("model")
    if not isinstance(version, str) or not isinstance(model, str):
        return None
    if not VERSION_ID.fullmatch(version) or not MODEL_NAME.fullmatch(model):
        return None
    return version, model


async def learn(pool: asyncpg.Pool, prediction: Any) -> None:
    """Remember the version id -> model pair a Replicate answer shows (the first one stays)."""
    found = mapping_in(prediction)
    if found is not None:
        async with pool.acquire() as conn:
            await conn.execute(LEARN, *found)


async def lookup(pool: asyncpg.Pool, version_id: str | None) -> dict[str, str]:
    """`{version_id: model}` when Relay has learned that id, else `{}`."""
    if version_id is None:
        return {}
    async with pool.acquire() as conn:
        model = await conn.fetchval("SELECT model FROM model_versions WHERE version_id = $1", version_id)
    return {version_id: model} if model is not None else {}
