"""Replay stored events, in seq order, to a URL or to the live WebSocket subscribers.

To a URL: each event is re-signed with Standard Webhooks under its **original** `webhook-id`
(so receivers de-duplicate) and a fresh timestamp. Events are spread over a few lanes by
prediction, so concurrency is bounded and each prediction's events arrive in seq order. 429, 5xx
and network errors are retried with backoff (honouring `Retry-After`); redirects are not
followed (the signed POST is `net.sender`'s, shared with destinations; the policy is
`core.retry`'s). The first event that still fails stops the run: `resume_after` is the highest
seq below which everything was delivered, the value to pass as `after` to carry on.

To subscribers: the matching seqs are announced with `pg_notify` on `relay_replay`; every
instance's hub reads those rows and sends them marked `"replayed": true`. No row is added.
"""

from __future__ import annotations

import asyncio
import dataclasses
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from service.core.errors import ConfigError, InvalidRequest
from service.core.filters import EventFilter
from service.core.metrics import REPLAY_DELIVERIES
from service.core.retry import Backoff
from service.core.settings import decode_webhook_secret
from service.db import store
from service.db.connection import Connection
from service.db.events import body_bytes
from service.db.vault import Vault
from service.net.guard import require_public, system_resolve
from service.net.http1 import Pool
from service.net.sender import deliver, new_client

PAGE = 500
LANE_DEPTH = 100
DEFAULT_CONCURRENCY = 4
DEFAULT_RETRIES = 5
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
MAX_RETRY_AFTER = 120.0
REQUEST_TIMEOUT = 30.0
NOTIFY_LIMIT = 7900  # pg_notify payloads must stay under 8000 bytes
Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True)
class UrlTarget:
    url: str
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class FanoutTarget:
    pass


Target = UrlTarget | FanoutTarget


@dataclass
class Report:
    matched: int = 0
    delivered: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    first_seq: int | None = None
    last_seq: int | None = None
    predictions: int = 0
    dry_run: bool = False
    resume_after: int | None = None

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def url_target(url: Any, secret: Any) -> UrlTarget:
    """A validated URL target; InvalidRequest naming what is wrong."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("the replay target url must be an http:// or https:// URL with a host")
    if not isinstance(secret, str) or not secret.startswith("whsec_"):
        raise InvalidRequest("the replay secret must be a whsec_… secret (base64 after whsec_)")
    try:
        key = decode_webhook_secret(secret, "the replay secret")
    except ConfigError as error:
        raise InvalidRequest(str(error)) from None
    return UrlTarget(url, key)


def target_from_json(target: Any) -> Target:
    """`{"url": U, "secret": "whsec_…"}` or `{"fanout": true}`."""
    if isinstance(target, dict) and target.get("fanout") is True and set(target) == {"fanout"}:
        return FanoutTarget()
    if isinstance(target, dict) and set(target) == {"url", "secret"}:
        return url_target(target["url"], target["secret"])
    raise InvalidRequest('target must be {"url": "https://…", "secret": "whsec_…"} or {"fanout": true}')


async def check_target_address(
    target: UrlTarget, allow_private: bool, resolve: Resolver = system_resolve
) -> None:
    """Refuse (400) a target whose host resolves to a non-global address, unless
    RELAY_REPLAY_PRIVATE is on. Checked once, before anything is sent."""
    if not allow_private:
        await require_public(target.url, "the replay target", resolve)


async def plan(conn: Connection, event_filter: EventFilter) -> Report:
    """What a replay would send: count, seq range and number of predictions."""
    where, args = event_filter.where()
    row = await conn.fetchrow(
        "SELECT count(*) AS matched, min(seq) AS first_seq, max(seq) AS last_seq,"
        f" count(DISTINCT prediction_id) AS predictions FROM events WHERE {where}",
        *args,
    )
    assert row is not None  # an aggregate without GROUP BY yields one row
    return Report(**dict(row), dry_run=True)


async def matching_rows(conn: Connection, event_filter: EventFilter) -> AsyncIterator[asyncpg.Record]:
    """The matching events page by page (keyset on seq), so memory stays flat."""
    while True:
        where, args = event_filter.where()
        rows = await store.fetch_where(conn, where, args, PAGE)
        for row in rows:
            yield row
        if not store.page_may_continue(rows, PAGE):
            return
        event_filter = event_filter.starting_after(rows[-1]["seq"])


async def replay(
    conn: Connection,
    event_filter: EventFilter,
    target: Target,
    vault: Vault,
    *,
    dry_run: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
    retries: int = DEFAULT_RETRIES,
    report: Report | None = None,
    progress: Callable[[int], None] = lambda n: None,
    public: bool = False,
) -> Report:
    """Run (or, with `dry_run`, only plan) a replay; `report` is filled in as it goes. With
    `public`, every connection goes to a checked global address (net/guard.py `public_only`)."""
    found = await plan(conn, event_filter)
    report = report if report is not None else Report()
    report.__dict__.update(found.__dict__, dry_run=dry_run, resume_after=event_filter.after)
    if dry_run or report.last_seq is None:
        return report
    # Events committed after the plan are not part of this replay.
    event_filter = dataclasses.replace(event_filter, before=report.last_seq + 1)
    if isinstance(target, FanoutTarget):
        await _announce(conn, event_filter, report, progress)
    else:
        async with new_client(REQUEST_TIMEOUT, connections=concurrency, public=public) as http:
            await _deliver_all(conn, event_filter, target, vault, report, http, retries, progress)
    return report


async def _announce(
    conn: Connection, event_filter: EventFilter, report: Report, progress: Callable[[int], None]
) -> None:
    chunk: list[str] = []
    size = 0
    async for row in matching_rows(conn, event_filter):
        seq = str(row["seq"])
        if size + len(seq) + 1 > NOTIFY_LIMIT:
            await _notify(conn, chunk, report, progress)
            chunk, size = [], 0
        chunk.append(seq)
        size += len(seq) + 1
    if chunk:
        await _notify(conn, chunk, report, progress)


async def _notify(conn: Connection, seqs: list[str], report: Report, progress: Callable[[int], None]) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", store.REPLAY_CHANNEL, ",".join(seqs))
    report.delivered += len(seqs)
    report.resume_after = int(seqs[-1])
    REPLAY_DELIVERIES.labels("fanout").inc(len(seqs))
    progress(len(seqs))


class Watermark:
    """The highest seq at or below which every event started so far was delivered."""

    def __init__(self, start: int, report: Report):
        self._open: deque[int] = deque()
        self._done: set[int] = set()
        self._report = report
        self._report.resume_after = start
        self.blocked = False

    def started(self, seq: int) -> None:
        if not self.blocked:
            self._open.append(seq)

    def finished(self, seq: int, ok: bool) -> None:
        self.blocked = self.blocked or not ok
        if self.blocked:
            return
        self._done.add(seq)
        while self._open and self._open[0] in self._done:
            self._done.discard(self._open[0])
            self._report.resume_after = self._open.popleft()


async def _deliver_all(
    conn: Connection,
    event_filter: EventFilter,
    target: UrlTarget,
    vault: Vault,
    report: Report,
    http: Pool,
    retries: int,
    progress: Callable[[int], None],
) -> None:
    """One lane per connection; a prediction's events share a lane, so they go in order."""
    watermark = Watermark(event_filter.after, report)
    lanes: list[asyncio.Queue[asyncpg.Record | None]] = [
        asyncio.Queue(maxsize=LANE_DEPTH) for _ in range(http.connections)
    ]

    async def lane(queue: asyncio.Queue[asyncpg.Record | None]) -> None:
        while (row := await queue.get()) is not None:
            if watermark.blocked:
                continue  # drain without sending: the run is stopping
            reason = await send(http, target, row, retries, vault)
            watermark.finished(row["seq"], reason is None)
            if reason is None:
                report.delivered += 1
                progress(1)
            else:
                report.failed.append({"seq": row["seq"], "reason": reason})

    workers = [asyncio.create_task(lane(queue)) for queue in lanes]
    try:
        async for row in matching_rows(conn, event_filter):
            if watermark.blocked:
                break
            watermark.started(row["seq"])
            await lanes[zlib.crc32(row["prediction_id"].encode()) % len(lanes)].put(row)
        for queue in lanes:
            await queue.put(None)
        await asyncio.gather(*workers)
    finally:
        for worker in workers:
            worker.cancel()


async def send(http: Pool, target: UrlTarget, row: asyncpg.Record, retries: int, vault: Vault) -> str | None:
    """Deliver one event; None when the receiver took it (2xx), else why it did not."""
    policy = Backoff(
        attempts=retries + 1, base=BACKOFF_BASE, cap=BACKOFF_CAP, max_retry_after=MAX_RETRY_AFTER,
        floor=0.5, cap_retry_after=True,
    )  # fmt: skip
    retried = REPLAY_DELIVERIES.labels("retried").inc
    attempt = await deliver(
        http, target.url, target.key, row["webhook_id"], body_bytes(row, vault), policy, retried
    )
    if attempt.ok:
        REPLAY_DELIVERIES.labels("delivered").inc()
        return None
    REPLAY_DELIVERIES.labels("failed").inc()
    return attempt.reason
