"""The batch scheduler: items start upstream as earlier ones end, never more than `concurrency`.

Each step of a batch (`advance`) runs in one transaction under a row lock on the batch's row
(`SELECT … FOR UPDATE`), so processes and instances sharing the database take turns per batch:
it copies terminal statuses from the log's projection onto items, counts the unfinished ones,
and claims pending items into the free slots by marking them `creating` (the durable intent)
before any upstream call. The create's answer then records the prediction id (`submitted`).
An item is never created twice: a `creating` item is never sent again, whatever happens. When
its answer was lost (crash, timeout, 5xx), the item waits for a delivery to its own webhook URL
(`links.py`) to bind the prediction; after `unknown_after` seconds without one it is `failed`
with CREATE_OUTCOME_UNKNOWN (a late delivery still binds it).

A step runs when a webhook for a batch item lands (the web layer calls `nudge`), after each
create, and every `tick` seconds (reconcile's appends, other instances, expired holds): no
upstream polling. Replicate is reached through `PredictionsApi`, which the app wires to its
upstream client, so this package does not import another feature.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from service.batches.links import ItemRef, item_webhook_url
from service.batches.store import DROP_INPUT, UNKNOWN_OUTCOME, InputUnreadable, open_input
from service.core.errors import RelayError
from service.core.logcontext import bind, bound
from service.core.retry import retry_after_seconds
from service.db.connection import Connection
from service.db.vault import Vault

log = logging.getLogger("relay.batches")

TICK = 1.0
UNKNOWN_AFTER = 600.0
BUDGET_RECHECK = 5.0
AUTH_HOLD = 60.0
BOUND_MEMORY = 100_000
# Replicate refused this input (or model): the item fails, the batch goes on.
ITEM_FAILURES = frozenset({"INVALID_REQUEST", "NOT_FOUND", "FILE_TOO_LARGE"})
# Replicate refused the call as a whole: nothing was created, the item waits its turn again.
NOT_CREATED = frozenset({"RATE_LIMIT_ERROR", "AUTHENTICATION_ERROR"})
# The upstream client names the transport error; these fail before a request can leave.
NEVER_CONNECTED = ("(ConnectError)",)
INPUT_UNREADABLE = "INPUT_UNREADABLE"  # sealed under a key-encryption key no longer configured


class Created(Protocol):
    @property
    def data(self) -> dict[str, Any]: ...


class PredictionsApi(Protocol):
    """What the scheduler needs from Replicate's API (service.upstream.client.Upstream fits)."""

    async def create(self, path: str, payload: dict[str, Any]) -> Created: ...

    async def cancel(self, prediction_id: str) -> Created: ...


# Why no new item may start now (RELAY_BUDGET reached), or None.
BudgetGate = Callable[[], Awaitable[str | None]]
# Called with (prediction id, owner) once an item's prediction is known (ownership records).
OwnerHook = Callable[[Connection, str, str], Awaitable[None]]


@dataclass(frozen=True)
class Claim:
    ref: ItemRef
    path: str
    payload: dict[str, Any]
    owner: str


@dataclass
class Plan:
    claims: list[Claim]
    cancels: list[str]


SYNC_ENDED = f"""
UPDATE batch_items i SET status = p.status, ended_at = now(), {DROP_INPUT}
FROM predictions p
WHERE i.batch_id = $1 AND i.status IN ('creating', 'submitted')
  AND p.prediction_id = i.prediction_id AND p.status_rank = 3
"""
GIVE_UP_UNKNOWN = """
UPDATE batch_items SET status = 'failed', ended_at = now(), error_code = $3,
    error = 'the create''s answer was lost and no delivery named this item; not sent again'
WHERE batch_id = $1 AND status = 'creating' AND prediction_id IS NULL
  AND claimed_at < now() - $2::float8 * interval '1 second'
"""
CANCEL_AGAIN = """
UPDATE batch_items SET cancel_sent = false WHERE prediction_id = $1 AND status = 'submitted'
"""
# A cancel Replicate refused for good: the prediction is gone, or has ended (422).
CANCEL_FINAL = frozenset({"NOT_FOUND", "INVALID_REQUEST"})
TO_CANCEL = """
UPDATE batch_items SET cancel_sent = true
WHERE batch_id = $1 AND status = 'submitted' AND NOT cancel_sent
RETURNING prediction_id
"""
# Both read a partial index: the unfinished items are few, and one pending item answers "any?".
OPEN_COUNTS = """
SELECT (SELECT count(*) FROM batch_items WHERE batch_id = $1 AND status IN ('creating', 'submitted'))
           AS unfinished,
       EXISTS (SELECT FROM batch_items WHERE batch_id = $1 AND status = 'pending') AS pending
"""
FINISH = """
UPDATE batches SET status = CASE WHEN cancel_requested THEN 'canceled' ELSE 'succeeded' END,
    ended_at = now(), hold_until = NULL, hold_reason = NULL
WHERE id = $1
"""
CLAIM = """
UPDATE batch_items SET status = 'creating', claimed_at = now()
WHERE batch_id = $1 AND index IN (
    SELECT index FROM batch_items WHERE batch_id = $1 AND status = 'pending' ORDER BY index LIMIT $2)
RETURNING index, input, input_sealed, kek_id
"""
RECORD_ANSWER = f"""
UPDATE batch_items SET prediction_id = coalesce(prediction_id, $3), {DROP_INPUT},
    status = CASE WHEN status = 'creating' THEN 'submitted' ELSE status END
WHERE batch_id = $1 AND index = $2
"""
NOT_SENT = """
UPDATE batch_items SET claimed_at = NULL,
    status = CASE WHEN (SELECT cancel_requested FROM batches WHERE id = $1) THEN 'canceled' ELSE 'pending' END
WHERE batch_id = $1 AND index = $2 AND status = 'creating' AND prediction_id IS NULL
"""
ITEM_FAILED = f"""
UPDATE batch_items SET status = 'failed', error_code = $3, error = $4, ended_at = now(), {DROP_INPUT}
WHERE batch_id = $1 AND index = $2 AND status = 'creating' AND prediction_id IS NULL
"""
HOLD = """
UPDATE batches SET hold_reason = $3,
    hold_until = greatest(coalesce(hold_until, now()), now() + $2::float8 * interval '1 second')
WHERE id = $1
"""


class Scheduler:
    def __init__(
        self,
        pool: asyncpg.Pool,
        api: PredictionsApi,
        link_key: bytes,
        webhook_url: str,
        *,
        vault: Vault | None = None,
        budget: BudgetGate | None = None,
        owners: OwnerHook | None = None,
        tick: float = TICK,
        unknown_after: float = UNKNOWN_AFTER,
        budget_recheck: float = BUDGET_RECHECK,
    ):
        self.pool, self.api = pool, api
        self.link_key, self.webhook_url = link_key, webhook_url
        self.budget, self.owners = budget, owners
        self.vault = vault or Vault()  # opens inputs sealed at submit (RELAY_ENCRYPTION_KEY)
        self.tick, self.unknown_after, self.budget_recheck = tick, unknown_after, budget_recheck
        self._nudge = asyncio.Event()
        self._calls: set[asyncio.Task[None]] = set()
        self._budget_reason: str | None = None
        # Items whose prediction this process has recorded: their webhooks need no binding.
        self._bound: collections.OrderedDict[ItemRef, None] = collections.OrderedDict()
        self._budget_checked = -budget_recheck

    def nudge(self) -> None:
        self._nudge.set()

    def remember_bound(self, ref: ItemRef) -> None:
        self._bound[ref] = None
        while len(self._bound) > BOUND_MEMORY:
            self._bound.popitem(last=False)

    def knows_bound(self, ref: ItemRef) -> bool:
        """Whether this process recorded the item's prediction (a webhook for it binds nothing)."""
        return ref in self._bound

    async def run(self) -> None:
        """Step every running batch on each nudge, and every `tick` seconds, until cancelled."""
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.tick):
                        await self._nudge.wait()
                self._nudge.clear()
                try:
                    await self.step_all()
                except Exception as exc:  # noqa: BLE001 - the database may be restarting
                    log.warning("batch scheduling failed (%s); retrying", type(exc).__name__)
                    await asyncio.sleep(self.tick)
        finally:
            for task in self._calls:
                task.cancel()
            await asyncio.gather(*self._calls, return_exceptions=True)

    async def step_all(self) -> None:
        async with self.pool.acquire() as conn:
            ids = await conn.fetch("SELECT id FROM batches WHERE status = 'running' ORDER BY created_at")
        for row in ids:
            self.launch(await self.advance(row["id"]))

    async def drain(self) -> None:
        """Wait for the upstream calls started so far to finish."""
        while self._calls:
            await asyncio.gather(*list(self._calls), return_exceptions=True)

    def launch(self, plan: Plan) -> None:
        for claim in plan.claims:
            self._spawn(self._create(claim))
        for prediction_id in plan.cancels:
            self._spawn(self._cancel(prediction_id))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def advance(self, batch_id: str) -> Plan:
        """One step of one batch, under its row lock; the upstream calls it decided on."""
        with bound(batch_id=batch_id):
            return await self._advance(batch_id)

    async def _advance(self, batch_id: str) -> Plan:
        plan = Plan([], [])
        async with self.pool.acquire() as conn, conn.transaction():
            batch = await conn.fetchrow(
                "SELECT *, coalesce(hold_until > now(), false) AS holding FROM batches"
                " WHERE id = $1 AND status = 'running' FOR UPDATE",
                batch_id,
            )
            if batch is None:
                return plan
            await conn.execute(SYNC_ENDED, batch_id)
            await conn.execute(GIVE_UP_UNKNOWN, batch_id, self.unknown_after, UNKNOWN_OUTCOME)
            if batch["cancel_requested"]:
                plan.cancels = [r["prediction_id"] for r in await conn.fetch(TO_CANCEL, batch_id)]
            counts = await conn.fetchrow(OPEN_COUNTS, batch_id)
            assert counts is not None  # a SELECT without FROM returns one row
            if counts["unfinished"] == 0 and not counts["pending"]:
                await conn.execute(FINISH, batch_id)
                log.info("batch %s ended", batch_id)
                return plan
            slots = batch["concurrency"] - counts["unfinished"]
            if batch["cancel_requested"] or not counts["pending"] or slots <= 0:
                return plan
            if not await self._may_start(conn, batch):
                return plan
            for row in await conn.fetch(CLAIM, batch_id, slots):
                try:
                    plan.claims.append(self._claim(batch, row))
                except InputUnreadable as error:
                    reason = f"its input cannot be opened: {error}"
                    await conn.execute(ITEM_FAILED, batch_id, row["index"], INPUT_UNREADABLE, reason)
                    log.warning("batch %s item %d: %s", batch_id, row["index"], reason)
        return plan

    async def _may_start(self, conn: Connection, batch: asyncpg.Record) -> bool:
        """No new item while a hold runs or the budget is spent; the reason is kept on the batch."""
        if batch["holding"]:
            return False
        reason = await self._budget_block()
        if reason != batch["hold_reason"] or batch["hold_until"] is not None:
            await conn.execute(
                "UPDATE batches SET hold_reason = $2, hold_until = NULL WHERE id = $1", batch["id"], reason
            )
        return reason is None

    async def _budget_block(self) -> str | None:
        if self.budget is None:
            return None
        # The spend is a sum over the month's predictions: read at most every `budget_recheck`
        # seconds, so a batch may start a few items past the budget, never a flood.
        if time.monotonic() - self._budget_checked >= self.budget_recheck:
            self._budget_reason = await self.budget()
            self._budget_checked = time.monotonic()
        return self._budget_reason

    def _claim(self, batch: asyncpg.Record, row: asyncpg.Record) -> Claim:
        payload = {
            **json.loads(batch["target"]),
            "input": open_input(self.vault, batch["id"], row),
            "webhook_events_filter": list(batch["events_filter"]),
        }
        payload.pop("model", None)  # the model is in the path; a version goes in the body
        return Claim(ItemRef(batch["id"], row["index"]), batch["path"], payload, batch["owner"])

    async def _create(self, claim: Claim) -> None:
        ref = claim.ref
        bind(batch_id=ref.batch_id)  # this create runs in a task of its own: its log lines say so
        payload = {**claim.payload, "webhook": item_webhook_url(self.webhook_url, self.link_key, ref)}
        try:
            try:
                reply = await self.api.create(claim.path, payload)
            except RelayError as error:
                await self._refused(ref, error)
                return
            except Exception as exc:  # noqa: BLE001 - whatever it was, the create may have happened
                log.warning("batch %s item %d: create outcome unknown (%s)", ref.batch_id, ref.index, exc)
                return
            prediction_id = reply.data.get("id")
            if not isinstance(prediction_id, str) or not prediction_id:
                log.warning("batch %s item %d: the create's answer has no id", ref.batch_id, ref.index)
                return
            async with self.pool.acquire() as conn:
                await conn.execute(RECORD_ANSWER, ref.batch_id, ref.index, prediction_id)
                self.remember_bound(ref)
                if self.owners is not None:
                    await self.owners(conn, prediction_id, claim.owner)
        except Exception as exc:  # noqa: BLE001 - a lost record is recovered by the item's webhook
            log.warning("batch %s item %d: could not record the create (%s)", ref.batch_id, ref.index, exc)
        finally:
            self.nudge()

    async def _refused(self, ref: ItemRef, error: RelayError) -> None:
        never_sent = error.code == "NETWORK_ERROR" and error.message.endswith(NEVER_CONNECTED)
        async with self.pool.acquire() as conn:
            if never_sent:
                await conn.execute(NOT_SENT, ref.batch_id, ref.index)
                await conn.execute(HOLD, ref.batch_id, 1.0, f"{error.code}: {error.message}")
            elif error.code in NOT_CREATED:
                wait = retry_after_seconds(error.headers.get("Retry-After"))
                wait = AUTH_HOLD if error.code == "AUTHENTICATION_ERROR" else (wait or 1.0)
                async with conn.transaction():
                    await conn.execute(NOT_SENT, ref.batch_id, ref.index)
                    await conn.execute(HOLD, ref.batch_id, wait, f"{error.code}: {error.message}")
                log.info(
                    "batch %s: Replicate answered %s; no new item for %.0fs", ref.batch_id, error.code, wait
                )
            elif error.code in ITEM_FAILURES:
                await conn.execute(ITEM_FAILED, ref.batch_id, ref.index, error.code, error.message)
                log.info("batch %s item %d failed: %s", ref.batch_id, ref.index, error.code)
            else:
                log.warning(
                    "batch %s item %d: create outcome unknown (%s)", ref.batch_id, ref.index, error.code
                )

    async def _cancel(self, prediction_id: str) -> None:
        try:
            await self.api.cancel(prediction_id)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the prediction may still run
            code = exc.code if isinstance(exc, RelayError) else type(exc).__name__
            log.warning("could not cancel batch prediction %s (%s)", prediction_id, code)
            if code not in CANCEL_FINAL:
                # Still running upstream, at a cost: the next step sends the cancel again.
                with contextlib.suppress(Exception):  # the database may be down: nothing more to do here
                    async with self.pool.acquire() as conn:
                        await conn.execute(CANCEL_AGAIN, prediction_id)
