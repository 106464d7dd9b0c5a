"""Per-process fan-out: one LISTEN connection, one reader of the log, bounded subscriber queues.

The writer `pg_notify`s a seq inside its transaction; the hub wakes, reads rows with
`seq > cursor` from the log (seq order is visibility order, so nothing is skipped), and offers
each event's message, serialised once, to every interested subscriber. A subscriber whose queue
is full is marked overflowed and its socket is closed with 1013; it resumes with `after=`.
If the LISTEN connection drops, the hub reconnects and catches up from its cursor; a periodic
poll covers a connection that dies silently. Rows this process's own writer commits are handed
over directly (`committed_here`) when they continue the cursor without a gap, and then need no
read; while nobody subscribes, nothing is read at all.

A replay to live subscribers arrives on `relay_replay` as a list of seqs; the hub reads those
rows and sends them marked replayed, whatever each subscriber's cursor, without moving its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import asyncpg

from service.core.metrics import LISTENER_RECONNECTS, SLOW_CLIENT_CLOSES, SUBSCRIBERS
from service.core.statuses import is_terminal
from service.db import store
from service.db.connection import Row
from service.db.database import HeldConnection
from service.db.events import event_text
from service.db.vault import Vault

log = logging.getLogger("relay.fanout")

READ_PAGE = 1000
POLL_INTERVAL = 1.0
LISTEN_CHECK_INTERVAL = 5.0
PROBE_TIMEOUT = 2.0
LISTEN_BLOCKED = (
    "LISTEN through RELAY_LISTEN_DATABASE_URL received no notification within {timeout:g} s: a "
    "transaction pooler is in the way; point RELAY_LISTEN_DATABASE_URL at Postgres directly or at "
    "a session pooler (until then live events arrive only by the periodic poll)"
)
RECONNECT_DELAY = 0.5


@dataclass(frozen=True)
class Message:
    seq: int
    text: str
    terminal: bool = False
    replayed: bool = False
    prediction_id: str = ""


class Subscriber:
    """One socket's view of the hub: a queue bounded in messages and in bytes, and the reason it
    must stop, if any. Counting messages alone let one socket that never read pin 900 events
    of 1 MiB; a message larger than the byte bound still goes through an empty queue."""

    def __init__(
        self, prediction_id: str | None, queue_size: int, after: int = 0, queue_bytes: int | None = None
    ):
        self.prediction_id = prediction_id
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=queue_size)
        self.queue_bytes = queue_bytes
        self.queued_bytes = 0
        self.live_from = after  # live messages at or below this seq are the backlog's, or the client's
        self.stop_code: int | None = None
        self.stopped = asyncio.Event()

    def wants(self, message: Message) -> bool:
        """Replays always; live messages only past `live_from` (it may rise after queueing)."""
        return message.replayed or message.seq > self.live_from

    def offer(self, message: Message) -> None:
        if self.stop_code is not None or not self.wants(message):
            return
        size = len(message.text)
        over_bytes = self.queue_bytes is not None and self.queued_bytes + size > self.queue_bytes
        if over_bytes and not self.queue.empty():
            self._overflow()
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self._overflow()
            return
        self.queued_bytes += size

    async def next(self) -> Message:
        """The next queued message (the writer's side of the queue)."""
        message = await self.queue.get()
        self.queued_bytes -= len(message.text)
        return message

    def _overflow(self) -> None:
        SLOW_CLIENT_CLOSES.inc()
        self.stop(1013)

    def stop(self, code: int) -> None:
        if self.stop_code is None:
            self.stop_code = code
            self.stopped.set()


Connect = Callable[[], Awaitable[asyncpg.Connection]]


class Hub:
    def __init__(self, pool: asyncpg.Pool, connect: Connect, vault: Vault):
        self._pool = pool
        self._reader = HeldConnection(pool, 5)
        self._connect = connect
        self._vault = vault
        self.cursor = 0
        self._subscribers: dict[str | None, set[Subscriber]] = defaultdict(set)
        self._nudge = asyncio.Event()
        self._notified = 0  # the newest seq a notification announced
        self._stale = True  # rows may have committed unannounced: read the log on the next wake
        self._replays: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing_code: int | None = None
        self.listening = asyncio.Event()
        self.listen_blocked: str | None = None  # why LISTEN cannot receive, once the probe failed

    async def start(self) -> None:
        async with self._pool.acquire() as conn:
            self.cursor = await store.max_seq(conn)
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="relay-hub-listen"),
            asyncio.create_task(self._read_forever(), name="relay-hub-read"),
            asyncio.create_task(self._replay_forever(), name="relay-hub-replay"),
        ]

    async def stop(self, code: int = 1001) -> None:
        self._closing_code = code
        for subscriber in self.all_subscribers():
            subscriber.stop(code)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._reader.release()

    def all_subscribers(self) -> list[Subscriber]:
        return [s for group in self._subscribers.values() for s in group]

    def subscribe(self, subscriber: Subscriber) -> None:
        """Start live delivery past this process's cursor (and past the client's `after`).

        The caller then reads the log's horizon H, raises `live_from` to it and sends the backlog
        up to H from the log: every event is either at or below H (backlog) or above it (live,
        since the hub reads every seq past its cursor), never both.
        """
        subscriber.live_from = max(subscriber.live_from, self.cursor)
        self._subscribers[subscriber.prediction_id].add(subscriber)
        SUBSCRIBERS.inc()
        if self._closing_code is not None:
            subscriber.stop(self._closing_code)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        group = self._subscribers.get(subscriber.prediction_id)
        if group is not None and subscriber in group:
            group.discard(subscriber)
            SUBSCRIBERS.dec()
            if not group:
                del self._subscribers[subscriber.prediction_id]

    def dispatch(self, rows: Iterable[Row], *, replayed: bool = False) -> None:
        for row in rows:
            if not replayed and row["seq"] <= self.cursor:
                continue  # handed over by this process's writer while the log was being read
            targets = self._targets(row["prediction_id"])
            if targets:
                message = Message(
                    row["seq"],
                    event_text(row, self._vault, replayed=replayed),
                    terminal=is_terminal(row["status"]) and not replayed,
                    replayed=replayed,
                    prediction_id=row["prediction_id"],
                )
                for subscriber in targets:
                    subscriber.offer(message)
            if not replayed:
                self.cursor = max(self.cursor, row["seq"])

    def committed_here(self, rows: list[tuple[int, store.Delivery]]) -> None:
        """Rows this process's writer has just committed, in clear (encryption off). When they
        continue the cursor without a gap (no other process's rows before them, no seq lost to a
        duplicate or a failed batch), no other row can lie between: they are delivered as they
        are, and the notification they cause finds nothing new to read. Otherwise the
        notification makes the hub read the log, as for another process's rows."""
        if not rows or not self._subscribers:
            return
        rows = sorted(rows, key=lambda row: row[0])
        first, last = rows[0][0], rows[-1][0]
        if first != self.cursor + 1 or last - first != len(rows) - 1:
            return
        self.dispatch(
            {
                "seq": seq,
                "prediction_id": d.prediction_id,
                "status": d.status,
                "webhook_id": d.webhook_id,
                "source": d.source,
                "received_at": d.received_at,
                "body": d.body,
                "encrypted": False,
            }
            for seq, d in rows
        )

    def _targets(self, prediction_id: str) -> list[Subscriber]:
        return [*self._subscribers.get(prediction_id, ()), *self._subscribers.get(None, ())]

    async def _read_forever(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that lands as the
            # nudge arrives, and the hub then never stops (SIGTERM under load hung on it).
            try:
                async with asyncio.timeout(POLL_INTERVAL):
                    await self._nudge.wait()
            except TimeoutError:
                self._stale = True  # the periodic read, for a LISTEN connection that died quietly
            self._nudge.clear()
            if self._notified <= self.cursor and not self._stale:
                continue  # only notifications of rows already delivered (committed_here)
            self._stale = False
            try:
                await self._read_new()
            except Exception as exc:  # noqa: BLE001 - the database may be restarting
                log.warning("fan-out could not read the log (%s); retrying", type(exc).__name__)
                self._stale = True
                await asyncio.sleep(RECONNECT_DELAY)

    async def _read_new(self) -> None:
        while True:
            if not self._subscribers:
                # Nobody to deliver to, so nothing to read: seq order is commit order, so every
                # seq up to a notified one has committed and the cursor may pass it unread.
                self.cursor = max(self.cursor, self._notified)
                return
            async with self._reader.use() as conn:
                rows = await store.fetch_events(conn, after=self.cursor, limit=READ_PAGE)
            self.dispatch(rows)
            if not store.page_may_continue(rows, READ_PAGE):
                return

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        text = str(payload)  # asyncpg passes a str; its type says object
        if text.isdigit():
            self._notified = max(self._notified, int(text))
        self._nudge.set()

    def _on_replay(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self._replays.put_nowait(str(payload))

    async def _replay_forever(self) -> None:
        while True:
            payload = await self._replays.get()
            seqs = [int(part) for part in payload.split(",") if part.isascii() and part.isdigit()]
            try:
                await self._replay_seqs(seqs)
            except Exception as exc:  # noqa: BLE001 - a live replay is best effort
                log.warning("could not read %d replayed events (%s)", len(seqs), type(exc).__name__)

    async def _replay_seqs(self, seqs: list[int]) -> None:
        """Read the replayed rows page by page (bounded in rows and bytes) and send them."""
        after = 0
        while True:
            async with self._pool.acquire(timeout=5) as conn:
                rows = await store.fetch_seqs(conn, seqs, after, READ_PAGE)
            self.dispatch(rows, replayed=True)
            if not store.page_may_continue(rows, READ_PAGE):
                return
            after = rows[-1]["seq"]

    async def _listen_forever(self) -> None:
        first = True
        while True:
            conn = None
            try:
                conn = await self._connect()
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await self._probe(conn)  # first, so the connection's last statement is the LISTEN
                await conn.add_listener(store.NOTIFY_CHANNEL, self._on_notify)
                await conn.add_listener(store.REPLAY_CHANNEL, self._on_replay)
                if not first:
                    LISTENER_RECONNECTS.inc()
                first = False
                self.listening.set()
                self._stale = True  # catch up on whatever was committed while we were away
                self._nudge.set()
                await self._watch(conn, lost)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.warning("LISTEN connection lost (%s); reconnecting", type(exc).__name__)
            finally:
                self.listening.clear()
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(RECONNECT_DELAY)

    def listen_warning(self) -> dict[str, list[str]]:
        """For /readyz: Relay works without LISTEN (the poll), but an operator must hear of it."""
        return {"warnings": [self.listen_blocked]} if self.listen_blocked else {}

    async def _probe(self, conn: asyncpg.Connection) -> None:
        """Send one notification through the pool and wait for it on the LISTEN connection: a
        transaction pooler accepts LISTEN, then hands the server connection to someone else."""
        channel = f"relay_probe_{os.getpid()}_{secrets.token_hex(4)}"
        heard = asyncio.Event()

        def on_probe(*_: object) -> None:
            heard.set()

        await conn.add_listener(channel, on_probe)
        try:
            async with self._pool.acquire() as sender:
                await sender.execute("SELECT pg_notify($1, '')", channel)
            async with asyncio.timeout(PROBE_TIMEOUT):
                await heard.wait()
        except TimeoutError:
            if self.listen_blocked is None:
                self.listen_blocked = LISTEN_BLOCKED.format(timeout=PROBE_TIMEOUT)
                log.error(self.listen_blocked)
            return
        finally:
            with contextlib.suppress(Exception):
                await conn.remove_listener(channel, on_probe)
        self.listen_blocked = None

    @staticmethod
    async def _watch(conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Return when the connection is gone, noticing one that died without a FIN."""
        while not lost.is_set():
            try:
                async with asyncio.timeout(LISTEN_CHECK_INTERVAL):
                    await lost.wait()
            except TimeoutError:
                async with asyncio.timeout(LISTEN_CHECK_INTERVAL):
                    await conn.fetchval("SELECT 1")
