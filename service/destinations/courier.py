"""Sends one destination's events, while this instance holds that destination (`manager`).

Fast path: events past the scan position are POSTed at once, a prediction's next event only
after its previous one succeeded (a chain per prediction, in memory), at most `concurrency`
requests in flight. Nothing is written for a success.

Slow path: an event that fails becomes a row of `destination_events` (`owed`, with its attempt
count and `next_at` from the retry schedule), together with the events of its prediction queued
behind it; later events of a prediction with owed rows are added behind them. Only the lowest
owed seq of a prediction (its head) is sent; when it succeeds (row deleted) or is exhausted, the
next one is. So one failing prediction holds back only itself.

Durability: the stored cursor is a watermark: every matching event at or below it was delivered
or is owed in the table. It is written after the rows that justify it, so a `kill -9` at any
moment loses nothing; the events between the stored cursor and the true position are sent again
(at least once; receivers de-duplicate by `webhook-id`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import asyncpg

from service.core.crypto import Unreadable
from service.core.filters import EventFilter
from service.core.logcontext import bind
from service.core.metrics import DESTINATION_EVENTS, DESTINATION_LAG_EVENTS, DESTINATION_LAG_SECONDS
from service.core.retry import scheduled_delay
from service.core.settings import decode_webhook_secret
from service.db import store
from service.db.connection import Connection
from service.db.events import body_bytes
from service.db.vault import Vault
from service.destinations.model import event_filter
from service.net.http1 import Pool
from service.net.sender import Attempt, new_client, post_signed

log = logging.getLogger("relay.destinations")

PAGE = 500
REFRESH_EVERY = 1.0
SCAN_GAP = 0.02  # after a short page, the next scan waits this long for more commits
MAX_IN_MEMORY = 5000  # events scanned but not yet resolved; the scan waits above this
IDLE_WAIT = 1.0  # longest sleep between looks at the log, the due retries and the settings
FLUSH_EVERY = 0.2  # seconds between cursor writes while events flow
STATS_EVERY = 2.0
REQUEST_TIMEOUT = 15.0
MAX_ERROR = 300

HEADS = """
SELECT h.seq, h.attempts FROM (
    SELECT DISTINCT ON (prediction_id) seq, prediction_id, attempts, next_at
    FROM destination_events WHERE destination_id = $1 AND state = 'owed'
    ORDER BY prediction_id, seq
) h
WHERE h.next_at <= now() AND NOT h.prediction_id = ANY($2::text[])
ORDER BY h.seq LIMIT $3
"""

NEXT_DUE = "SELECT min(next_at) - now() FROM destination_events WHERE destination_id = $1 AND state = 'owed'"

OWE = """
INSERT INTO destination_events (destination_id, seq, prediction_id, state, attempts, next_at, last_error)
SELECT $1, s, p, 'owed', a, now() + make_interval(secs => d), e
FROM unnest($2::int8[], $3::text[], $4::int4[], $5::float8[], $6::text[]) AS t(s, p, a, d, e)
ON CONFLICT (destination_id, seq) DO NOTHING
"""

STATS = """
SELECT count(*) AS pending,
       (SELECT received_at FROM events WHERE seq = min(e.seq)) AS oldest
FROM destination_events e WHERE e.destination_id = $1 AND e.state = 'owed'
"""


@dataclass
class Config:
    url: str
    key: bytes
    filter: EventFilter
    paused: bool


class Gone(Exception):
    """The destination was removed (or its secret cannot be read): its courier stops."""


class Courier:
    def __init__(
        self,
        pool: asyncpg.Pool,
        destination_id: str,
        vault: Vault,
        schedule: tuple[float, ...],
        concurrency: int,
        *,
        public: bool = False,
    ):
        self.pool, self.id, self.vault = pool, destination_id, vault
        self.schedule, self.concurrency, self.public = schedule, concurrency, public
        self.wake = asyncio.Event()
        self.config: Config | None = None
        # Set while the destination is not paused: every POST waits for it, so a pause also
        # holds the events already scanned into memory (they stay unresolved, sent on resume).
        self.sending = asyncio.Event()
        self.scanned_to = 0
        self.stored_cursor = 0
        self.chains: dict[str, deque[asyncpg.Record]] = {}  # the fast path, per prediction
        self.unresolved: list[int] = []  # a heap of the seqs in chains
        self.resolved: set[int] = set()
        self.retrying: set[str] = set()  # predictions whose owed head is being sent
        self.tasks: set[asyncio.Task[None]] = set()
        self.http: Pool | None = None
        self.sent_since_flush = 0
        self.failure: str | None = None  # the newest error, to record at the next flush
        self.next_stats = 0.0
        self.diverted: set[str] = set()
        self.broken: BaseException | None = None
        # Fewer queries per wake: settings are re-read every REFRESH_EVERY (or when told of a
        # change), owed rows looked at when one may be due, and the scan waits SCAN_GAP between
        # pages, so a burst of commits is read in one page rather than one query each.
        self.refresh_at = 0.0
        self.due_at = 0.0  # when an owed head may be due (0: look now)
        self.maybe_owed = True  # False once a look found no owed rows and none were made since
        self.owed_epoch = 0  # counts the moments owed rows may have appeared
        self.scan_at = 0.0
        self.sent_counter = DESTINATION_EVENTS.labels(destination_id, "sent")
        self.failed_counter = DESTINATION_EVENTS.labels(destination_id, "failed")

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Send until cancelled or the destination is removed."""
        bind(destination_id=self.id)  # the courier is a task of its own: every line it logs says which
        self.http = new_client(REQUEST_TIMEOUT, connections=self.concurrency, public=self.public)
        try:
            await self.load()
            last_flush = 0.0
            while True:
                if self.broken is not None:
                    raise self.broken
                now = time.monotonic()
                if now >= self.refresh_at:
                    await self.refresh()
                    self.refresh_at = now + REFRESH_EVERY
                assert self.config is not None
                busy = False
                if self.config.paused:
                    self.due_at = max(self.due_at, now + IDLE_WAIT)
                else:
                    if now >= self.scan_at:
                        busy = await self.scan()
                        self.scan_at = now + (0.0 if busy else SCAN_GAP)
                    if now >= self.due_at:
                        await self.send_due()
                if now - last_flush >= FLUSH_EVERY:
                    await self.flush()
                    last_flush = now
                if not busy:
                    await self.sleep()
        except Gone:
            return
        finally:
            await self.stop()

    def changed(self) -> None:
        """The destination was changed elsewhere (paused, resumed, retried): look again now."""
        self.refresh_at = self.due_at = 0.0
        self.owe_maybe()
        self.wake.set()

    def owe_maybe(self) -> None:
        self.maybe_owed = True
        self.owed_epoch += 1

    async def sleep(self) -> None:
        now = time.monotonic()
        wake_at = min(now + IDLE_WAIT, self.due_at, self.refresh_at)
        if self.wake.is_set():
            wake_at = max(wake_at, self.scan_at)  # news: look again, but not before the gap
        if wake_at > now:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wake_at - now):
                    await self.wake.wait()
                    if self.scan_at > time.monotonic():
                        await asyncio.sleep(self.scan_at - time.monotonic())
        self.wake.clear()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.flush()  # what finished is kept; what was cut off is sent again
        if self.http is not None:
            await self.http.aclose()
        DESTINATION_LAG_EVENTS.labels(self.id).set(0)
        DESTINATION_LAG_SECONDS.labels(self.id).set(0)

    async def load(self) -> None:
        async with self.pool.acquire() as conn:
            cursor = await conn.fetchval("SELECT cursor FROM destinations WHERE id = $1", self.id)
        if cursor is None:
            raise Gone
        self.scanned_to = self.stored_cursor = cursor

    async def refresh(self) -> None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT url, secret, kek_id, filter::text AS filter, paused FROM destinations WHERE id = $1",
                self.id,
            )
        if row is None:
            raise Gone
        if self.config is None or self.config.url != row["url"] or self.config.paused != row["paused"]:
            try:
                secret = self.vault.open_secret(row["secret"], row["kek_id"], self.id)
            except Unreadable:
                log.error("destination %s: its secret cannot be read with RELAY_ENCRYPTION_KEY", self.id)
                raise Gone from None
            key = decode_webhook_secret(secret, "the destination's secret")
            self.config = Config(row["url"], key, event_filter(row["filter"]), row["paused"])
            if row["paused"]:
                self.sending.clear()
            else:
                self.sending.set()
            if row["kek_id"] != self.vault.current_id:
                await self._reseal(secret, row["secret"])

    async def _reseal(self, secret: str, stored: bytes) -> None:
        """Seal the secret under the current RELAY_ENCRYPTION_KEY (after a rotation, or once
        encryption is turned on), so the old key can be retired; in clear when it is off."""
        sealed, kek_id = self.vault.seal_secret(secret, self.id)
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE destinations SET secret = $2, kek_id = $3 WHERE id = $1 AND secret = $4",
                self.id,
                sealed,
                kek_id,
                stored,
            )

    # ------------------------------------------------------------------ fast path

    async def scan(self) -> bool:
        """Read the next page of matching events and start them; True when more may be waiting."""
        if len(self.unresolved) + PAGE > MAX_IN_MEMORY:
            return False
        assert self.config is not None
        self.diverted = set()
        async with self.pool.acquire() as conn:
            # Seq order is visibility order: every event up to the horizon read first is visible.
            horizon = await store.max_seq(conn)
            if horizon <= self.scanned_to:
                return False
            page = self.config.filter.starting_after(self.scanned_to)
            where, args = page.where()
            args.append(horizon)
            rows = await store.fetch_where(conn, f"{where} AND seq <= ${len(args)}", args, PAGE)
            owed = await self._owed_predictions(conn, rows) | self.diverted
            behind: list[tuple[asyncpg.Record, int, float, str | None]] = []
            for row in rows:
                prediction_id = row["prediction_id"]
                if prediction_id in owed and prediction_id not in self.chains:
                    behind.append((row, 0, 0.0, None))  # waits behind its prediction's owed events
                else:
                    self._start(row)
            if behind:
                self.owe_maybe()
                await self._owe(conn, behind)
        # A page is also cut by bytes (store.PAGE_BYTES): go on from its last row, never skip
        # what the cut left out.
        more = store.page_may_continue(rows, PAGE)
        self.scanned_to = rows[-1]["seq"] if more else horizon
        return more

    async def _owed_predictions(self, conn: Connection, rows: list[asyncpg.Record]) -> set[str]:
        if not rows or not self.maybe_owed:
            return set()
        found = await conn.fetch(
            "SELECT DISTINCT prediction_id FROM destination_events"
            " WHERE destination_id = $1 AND state = 'owed' AND prediction_id = ANY($2::text[])",
            self.id,
            list({r["prediction_id"] for r in rows}),
        )
        return {r["prediction_id"] for r in found}

    def _start(self, row: asyncpg.Record) -> None:
        heapq.heappush(self.unresolved, row["seq"])
        chain = self.chains.get(row["prediction_id"])
        if chain is not None:
            chain.append(row)
            return
        self.chains[row["prediction_id"]] = deque([row])
        self._spawn(self._run_chain(row["prediction_id"]))

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Its events are neither sent nor owed: stop, and start again from the stored cursor.
            self.broken = task.exception()
        self.wake.set()

    async def _run_chain(self, prediction_id: str) -> None:
        chain = self.chains[prediction_id]
        while chain:
            row = chain[0]
            attempt = await self._post(row)
            if not attempt.ok:
                await self._divert(prediction_id, attempt)
                return
            chain.popleft()
            self._resolve(row["seq"])
        del self.chains[prediction_id]

    async def _divert(self, prediction_id: str, attempt: Attempt) -> None:
        """A fast-path failure: the event and those queued behind it become owed rows."""
        chain = self.chains[prediction_id]
        self.diverted.add(prediction_id)  # for a scan whose look at owed rows came before this
        self.owe_maybe()
        first = True
        while chain:
            rows = list(chain)
            entries = []
            for row in rows:
                if first:
                    entries.append((row, 1, self._delay(1, attempt), attempt.reason))
                    first = False
                else:
                    entries.append((row, 0, 0.0, None))
            async with self.pool.acquire() as conn:
                await self._owe(conn, entries)
            for row in rows:
                chain.popleft()
                self._resolve(row["seq"])
        del self.chains[prediction_id]
        self.owe_maybe()  # again: a look at owed rows may have run before these were committed
        self.due_at = min(self.due_at, time.monotonic() + self._delay_floor())

    def _delay_floor(self) -> float:
        return min(self.schedule[1:], default=0.0) * 0.8  # the earliest a first retry can be due

    def _delay(self, failures: int, attempt: Attempt) -> float:
        delay = scheduled_delay(self.schedule, failures, attempt.retry_after)
        return 0.0 if delay is None else delay

    async def _owe(
        self, conn: Connection, entries: list[tuple[asyncpg.Record, int, float, str | None]]
    ) -> None:
        await conn.execute(
            OWE,
            self.id,
            [r["seq"] for r, _, _, _ in entries],
            [r["prediction_id"] for r, _, _, _ in entries],
            [a for _, a, _, _ in entries],
            [d for _, _, d, _ in entries],
            [(e or "")[:MAX_ERROR] or None for _, _, _, e in entries],
        )
        # A first attempt that the schedule does not allow to be retried is exhausted at once.
        if len(self.schedule) <= 1:
            spent = await conn.fetch(
                "UPDATE destination_events SET state = 'exhausted' WHERE destination_id = $1"
                " AND state = 'owed' AND attempts >= $2 RETURNING seq, last_error",
                self.id,
                len(self.schedule),
            )
            for row in spent:  # counted and logged as an exhausted retry is
                DESTINATION_EVENTS.labels(self.id, "exhausted").inc()
                log.warning(
                    "destination %s: event seq %s exhausted its retries (%s)",
                    self.id,
                    row["seq"],
                    row["last_error"],
                )

    def _resolve(self, seq: int) -> None:
        self.resolved.add(seq)
        while self.unresolved and self.unresolved[0] in self.resolved:
            self.resolved.discard(heapq.heappop(self.unresolved))

    # ------------------------------------------------------------------ slow path

    async def send_due(self) -> None:
        """Send the owed heads whose time has come (one per prediction)."""
        room = self.concurrency * 4 - len(self.retrying)
        self.due_at = time.monotonic() + IDLE_WAIT
        if room <= 0:
            return
        epoch = self.owed_epoch
        async with self.pool.acquire() as conn:
            heads = await conn.fetch(HEADS, self.id, list(self.retrying), room)
            if not heads:
                due = await conn.fetchval(NEXT_DUE, self.id)
                if due is None and not self.retrying and epoch == self.owed_epoch:
                    self.maybe_owed = False
                elif due is not None:
                    self.due_at = time.monotonic() + max(0.0, min(IDLE_WAIT, due.total_seconds()))
                return
            rows = await store.fetch_seqs(conn, [h["seq"] for h in heads])
        attempts = {h["seq"]: h["attempts"] for h in heads}
        for row in rows:
            self.retrying.add(row["prediction_id"])
            self._spawn(self._retry_head(row, attempts[row["seq"]]))

    async def _retry_head(self, row: asyncpg.Record, attempts: int) -> None:
        try:
            attempt = await self._post(row)
            async with self.pool.acquire() as conn:
                if attempt.ok:
                    await conn.execute(
                        "DELETE FROM destination_events WHERE destination_id = $1 AND seq = $2",
                        self.id,
                        row["seq"],
                    )
                    return
                failures = attempts + 1
                delay = scheduled_delay(self.schedule, failures, attempt.retry_after)
                if delay is None:
                    DESTINATION_EVENTS.labels(self.id, "exhausted").inc()
                    log.warning(
                        "destination %s: event seq %s exhausted its retries (%s)",
                        self.id,
                        row["seq"],
                        attempt.reason,
                    )
                await conn.execute(
                    "UPDATE destination_events SET attempts = $3, last_error = $4,"
                    " state = CASE WHEN $5::float8 IS NULL THEN 'exhausted' ELSE 'owed' END,"
                    " next_at = now() + make_interval(secs => coalesce($5::float8, 0))"
                    " WHERE destination_id = $1 AND seq = $2",
                    self.id,
                    row["seq"],
                    failures,
                    (attempt.reason or "")[:MAX_ERROR],
                    delay,
                )
        finally:
            self.retrying.discard(row["prediction_id"])
            self.due_at = 0.0  # its prediction's next owed event may be due now

    # ------------------------------------------------------------------ sending

    async def _post(self, row: asyncpg.Record) -> Attempt:
        await self.sending.wait()  # paused: nothing leaves until resumed
        assert self.config is not None and self.http is not None
        body = body_bytes(row, self.vault)  # {"erased":true} once the prediction is forgotten
        # At most `concurrency` requests in flight: the pool's bound for the destination's origin.
        attempt = await post_signed(
            self.http,
            self.config.url,
            self.config.key,
            row["webhook_id"],
            body,
            {"relay-seq": str(row["seq"])},
        )
        if attempt.ok:
            self.sent_counter.inc()
            self.sent_since_flush += 1
        else:
            self.failed_counter.inc()
            self.failure = attempt.reason or "failed"
        return attempt

    # ------------------------------------------------------------------ bookkeeping

    async def flush(self) -> None:
        """Write the watermark cursor and the newest success or error."""
        cursor = self.unresolved[0] - 1 if self.unresolved else self.scanned_to
        sent, self.sent_since_flush = self.sent_since_flush, 0
        failure, self.failure = self.failure, None
        if (
            cursor == self.stored_cursor
            and not sent
            and failure is None
            and time.monotonic() < self.next_stats
        ):
            return
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE destinations SET cursor = greatest(cursor, $2),"
                " last_success_at = CASE WHEN $3 THEN now() ELSE last_success_at END,"
                " last_error = coalesce($4, last_error),"
                " last_error_at = CASE WHEN $4::text IS NULL THEN last_error_at ELSE now() END,"
                " failing_since = CASE WHEN $3 THEN NULL"
                "   WHEN $4::text IS NOT NULL THEN coalesce(failing_since, now()) ELSE failing_since END"
                " WHERE id = $1",
                self.id,
                cursor,
                sent > 0,
                failure[:MAX_ERROR] if failure else None,
            )
            self.stored_cursor = max(self.stored_cursor, cursor)
            if time.monotonic() >= self.next_stats:
                await self._publish_stats(conn)

    async def _publish_stats(self, conn: Connection) -> None:
        self.next_stats = time.monotonic() + STATS_EVERY
        stats = await conn.fetchrow(STATS, self.id)
        assert stats is not None  # an aggregate always has its row
        end = await store.max_seq(conn)
        behind = max(0, end - self.stored_cursor)
        oldest = stats["oldest"]
        if self.unresolved:
            first = await conn.fetchval("SELECT received_at FROM events WHERE seq = $1", self.unresolved[0])
            oldest = first if oldest is None or (first is not None and first < oldest) else oldest
        age = (
            await conn.fetchval("SELECT extract(epoch FROM now() - $1::timestamptz)", oldest) if oldest else 0
        )
        DESTINATION_LAG_EVENTS.labels(self.id).set(behind + stats["pending"])
        DESTINATION_LAG_SECONDS.labels(self.id).set(float(age or 0))
