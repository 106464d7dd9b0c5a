"""Reconcile: ask Replicate for predictions whose deliveries may have been lost.

Replicate never resends intermediate deliveries and retries the final one only for about a
minute, so a prediction can stay `processing` in Relay forever. Reconcile GETs it from the API
and, when the answer is ahead of the projection and differs from it, appends the exact bytes
as a `source: "reconcile"` event through the same group commit as webhooks. Its webhook-id
is derived from the content, so reconciling twice (or from two instances) appends it once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from service.core.errors import ConfigError, RelayError
from service.core.logcontext import bound
from service.core.metrics import RECONCILED
from service.core.settings import Settings
from service.core.statuses import is_terminal, rank
from service.core.validation import PREDICTION_ID
from service.db import database, store
from service.db.events import PREDICTION_FIELDS, open_body
from service.db.vault import Vault, check_keys
from service.ingest.committer import GroupCommitter, delivery_from
from service.upstream.client import Upstream

log = logging.getLogger("relay.reconcile")

BATCH = 100
# Predictions untouched for longer than this are left alone (Replicate forgets them anyway).
MAX_AGE_SECONDS = 24 * 3600

# Oldest first, from where the previous pass stopped ($4, $5: its last row, or NULL to start
# over): predictions that keep failing (unknown to Replicate, say) keep their age, so starting
# each pass at the oldest would give every pass to the same hundred of them.
DUE = """
SELECT prediction_id, updated_at FROM predictions
WHERE status_rank < 3
  AND updated_at < now() - $1::int * interval '1 second'
  AND updated_at > now() - $2::int * interval '1 second'
  AND ($4::timestamptz IS NULL OR (updated_at, prediction_id) > ($4::timestamptz, $5::text))
ORDER BY updated_at, prediction_id
LIMIT $3
"""


@dataclass(frozen=True)
class Outcome:
    prediction_id: str
    result: str  # "appended", "unchanged" or "failed"
    status: str | None = None
    seq: int | None = None
    reason: str = ""

    def line(self) -> str:
        if self.result == "appended":
            return f"{self.prediction_id}: appended seq {self.seq} ({self.status})"
        if self.result == "unchanged":
            return f"{self.prediction_id}: unchanged ({self.status})"
        return f"{self.prediction_id}: failed: {self.reason}"


def snapshot(prediction: Any) -> dict[str, Any]:
    """The fields that make two states of a prediction different for a watcher."""
    if not isinstance(prediction, dict):
        return {}
    return {name: prediction.get(name) for name in ("status", *PREDICTION_FIELDS)}


def reconcile_webhook_id(prediction_id: str, upstream: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(snapshot(upstream), sort_keys=True).encode()).hexdigest()
    return f"reconcile_{prediction_id}_{digest[:20]}"


def is_news(current: asyncpg.Record | None, upstream: dict[str, Any], vault: Vault) -> bool:
    """Whether the upstream state is ahead of the stored one and differs from it."""
    if current is None:
        return True
    status = upstream.get("status")
    if is_terminal(current["status"]) or not isinstance(status, str):
        return False
    if rank(status) < rank(current["status"]):
        return False
    return snapshot(open_body(current, vault)) != snapshot(upstream)


class Reconciler:
    def __init__(self, pool: asyncpg.Pool, committer: GroupCommitter, upstream: Upstream, vault: Vault):
        self.pool, self.committer, self.upstream, self.vault = pool, committer, upstream, vault
        self.resume_after: tuple[datetime, str] | None = None  # the last due row a pass took

    async def one(self, prediction_id: str) -> Outcome:
        with bound(prediction_id=prediction_id):  # the job's log lines name the prediction
            outcome = await self._check(prediction_id)
        RECONCILED.labels(outcome.result).inc()
        return outcome

    async def _check(self, prediction_id: str) -> Outcome:
        try:
            reply = await self.upstream.get(prediction_id)
            if reply.data.get("id") != prediction_id:
                return Outcome(prediction_id, "failed", reason="Replicate answered for another id")
            async with self.pool.acquire() as conn:
                current = await store.fetch_prediction(conn, prediction_id)
            if not is_news(current, reply.data, self.vault):
                return Outcome(prediction_id, "unchanged", current["status"] if current else None)
            webhook_id = reconcile_webhook_id(prediction_id, reply.data)
            delivery = delivery_from(reply.data, reply.body, webhook_id=webhook_id, source="reconcile")
            appended = await self.committer.submit(delivery)
        except RelayError as error:
            return Outcome(prediction_id, "failed", reason=f"{error.code}: {error.message}")
        result = "unchanged" if appended.duplicate else "appended"
        return Outcome(prediction_id, result, delivery.status, appended.seq)

    async def due(self, older_than: int) -> list[str]:
        """The next BATCH due predictions after the previous call's, wrapping to the oldest
        once the end is reached."""
        at, last_id = self.resume_after or (None, None)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(DUE, older_than, MAX_AGE_SECONDS, BATCH, at, last_id)
        ended = len(rows) < BATCH
        self.resume_after = None if ended else (rows[-1]["updated_at"], rows[-1]["prediction_id"])
        return [row["prediction_id"] for row in rows]

    async def reconcile_due(self, older_than: int) -> list[Outcome]:
        """One pass: up to BATCH due predictions, continuing where the last pass stopped."""
        return [await self.one(prediction_id) for prediction_id in await self.due(older_than)]

    async def reconcile_all_due(self, older_than: int) -> list[Outcome]:
        """Every due prediction, BATCH at a time (`relay reconcile` without an id)."""
        self.restart()
        outcomes = await self.reconcile_due(older_than)
        while self.resume_after is not None:
            outcomes += await self.reconcile_due(older_than)
        return outcomes

    def restart(self) -> None:
        """Make the next pass start at the oldest due prediction."""
        self.resume_after = None

    async def run(self, interval: int, older_than: int) -> None:
        """Every `interval` seconds, reconcile what has been open for `older_than` seconds."""
        while True:
            await asyncio.sleep(interval)
            try:
                outcomes = await self.reconcile_due(older_than)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive a database outage
                log.warning("reconcile pass failed: %s", type(exc).__name__)
                continue
            appended = sum(o.result == "appended" for o in outcomes)
            failed = sum(o.result == "failed" for o in outcomes)
            if appended or failed:
                log.info("reconcile: %d checked, %d appended, %d failed", len(outcomes), appended, failed)


async def reconcile_now(settings: Settings, dsn: str, prediction_id: str | None) -> list[Outcome]:
    """One pass from the command line: one prediction, or every one that is due."""
    vault = Vault(settings.key_encryption_keys)
    await check_keys(dsn, vault)  # a clear ConfigError if the database is unreachable or the key wrong
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, statement_cache_size=0)
    committer, upstream = GroupCommitter(pool, prepare=vault.prepare), Upstream(settings)
    committer.start()
    try:
        reconciler = Reconciler(pool, committer, upstream, vault)
        if prediction_id is not None:
            return [await reconciler.one(prediction_id)]
        return await reconciler.reconcile_all_due(settings.reconcile_after)
    finally:
        await committer.stop()
        await upstream.aclose()
        await pool.close()


def run_reconcile(prediction_id: str | None, settings: Settings) -> int:
    if settings.replicate_api_token is None:
        raise ConfigError(
            "REPLICATE_API_TOKEN is not set; reconcile reads predictions from Replicate's API, "
            "so set REPLICATE_API_TOKEN (or REPLICATE_API_KEY)"
        )
    if prediction_id is not None and not PREDICTION_ID.fullmatch(prediction_id):
        raise ConfigError(f"{prediction_id[:60]!r} is not a prediction id (letters, digits, '_' or '-')")
    with database.database_dsn(settings) as dsn:
        outcomes = asyncio.run(reconcile_now(settings, dsn, prediction_id))
    for outcome in outcomes:
        print(outcome.line())
    if prediction_id is None:
        print(f"reconciled {len(outcomes)} prediction(s) open for over {settings.reconcile_after}s")
    return 1 if any(o.result == "failed" for o in outcomes) else 0
