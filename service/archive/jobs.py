"""The archive's durable work queue in Postgres: finding jobs in the log, claiming, finishing.

A job is claimed with `FOR UPDATE SKIP LOCKED` inside a transaction that stays open for the
whole download and is committed with its outcome. So each URL is fetched by one process at a
time, whatever the number of instances, and a process that dies (even `kill -9`) releases its
jobs at once: Postgres ends its session and the rows are free for the next claim.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from service.archive.urls import output_urls, url_hash
from service.core import crypto
from service.core.hosts import HostPolicy
from service.db import store
from service.db.connection import Connection
from service.db.events import open_body
from service.db.vault import ERASURE_SOURCE, Vault

# Replicate deletes output files an hour after the prediction completes; the delivery that
# carries them arrives at completion, so retrying longer than this only asks for a 404.
URL_LIFETIME = timedelta(hours=1)
DISCOVER_BATCH = 500

INSERT_JOBS = """
INSERT INTO archive_jobs (url_hash, prediction_id, seq, url, encrypted, give_up_at)
SELECT * FROM unnest($1::bytea[], $2::text[], $3::int8[], $4::bytea[], $5::bool[], $6::timestamptz[])
ON CONFLICT (url_hash) DO NOTHING
"""

CLAIM = """
SELECT j.url_hash, j.prediction_id, j.url, j.encrypted, j.attempts, j.give_up_at,
       CASE WHEN j.encrypted THEN (SELECT k.wrapped FROM data_keys k
                                   WHERE k.prediction_id = j.prediction_id) END AS data_key
FROM archive_jobs j
WHERE j.status = 'pending' AND j.next_at <= now()
ORDER BY j.next_at
LIMIT 1
FOR UPDATE OF j SKIP LOCKED
"""

STORED = """
UPDATE archive_jobs SET status = 'stored', attempts = attempts + 1, reason = NULL, finished_at = now(),
       sha256 = $2, size = $3, content_type = $4, object_key = $5
WHERE url_hash = $1
"""
FAILED = """
UPDATE archive_jobs SET status = 'failed', attempts = attempts + 1, reason = $2, finished_at = now()
WHERE url_hash = $1
"""
RETRY = """
UPDATE archive_jobs SET attempts = attempts + 1, reason = $2,
       next_at = now() + $3::float8 * interval '1 second'
WHERE url_hash = $1
"""
QUEUE_STATS = """
SELECT count(*) AS pending, extract(epoch FROM now() - min(created_at))::float8 AS oldest
FROM archive_jobs WHERE status = 'pending'
"""


@dataclass(frozen=True)
class Job:
    url_hash: bytes
    prediction_id: str
    url: str
    encrypted: bool
    attempts: int
    give_up_at: datetime
    data_key: bytes | None  # the prediction's data key, unwrapped; None when in clear or forgotten

    @property
    def id(self) -> str:
        return self.url_hash.hex()[:16]


def url_aad(url_digest: bytes) -> str:
    """What a sealed URL is bound to, besides its prediction (its row's key)."""
    return "archive-url:" + url_digest.hex()


def job_from(row: asyncpg.Record, vault: Vault) -> Job:
    data_key = None
    url = bytes(row["url"])
    if row["encrypted"] and row["data_key"] is not None:
        data_key = vault.data_key(row["prediction_id"], row["data_key"])
        url = crypto.open_sealed(data_key, url, row["prediction_id"], url_aad(row["url_hash"]))
    return Job(
        url_hash=row["url_hash"],
        prediction_id=row["prediction_id"],
        url=url.decode() if not row["encrypted"] or data_key is not None else "",
        encrypted=row["encrypted"],
        attempts=row["attempts"],
        give_up_at=row["give_up_at"],
        data_key=data_key,
    )


@dataclass
class Discovered:
    events: int = 0
    jobs: int = 0
    erased: tuple[str, ...] = ()


JobRow = tuple[bytes, str, int, bytes, bool, datetime]


def _may_hold_urls(row: asyncpg.Record, policy: HostPolicy) -> bool:
    """Whether a row can carry an allowed URL: a clear body that names no allowed host is skipped
    without parsing it (discovery reads every event of the log)."""
    if row["encrypted"]:
        return True
    body = bytes(row["body"])
    return any(pattern.host.encode() in body for pattern in policy.patterns)


def _new_jobs(rows: list[asyncpg.Record], vault: Vault, policy: HostPolicy) -> tuple[list[JobRow], list[str]]:
    """(job rows to insert, predictions erased) for a page of the log."""
    jobs: dict[bytes, JobRow] = {}
    erased: list[str] = []
    for row in rows:
        prediction_id = row["prediction_id"]
        if row["source"] == ERASURE_SOURCE:
            erased.append(prediction_id)
            continue
        if not _may_hold_urls(row, policy):
            continue
        urls = output_urls(open_body(row, vault), policy)
        if not urls or (row["encrypted"] and row["data_key"] is None):
            continue
        data_key = vault.data_key(prediction_id, row["data_key"]) if row["encrypted"] else None
        for url in urls:
            digest = url_hash(url)
            if digest in jobs:
                continue
            stored = url.encode()
            if data_key is not None:
                stored = crypto.seal(data_key, stored, prediction_id, url_aad(digest))
            give_up = row["received_at"] + URL_LIFETIME
            jobs[digest] = (digest, prediction_id, row["seq"], stored, data_key is not None, give_up)
    return list(jobs.values()), erased


OnErased = Callable[[Connection, list[str]], Awaitable[object]]


async def discover(
    conn: Connection, vault: Vault, policy: HostPolicy, on_erased: OnErased | None = None
) -> Discovered | None:
    """Read the log past the archive's cursor and add a job per new allowed output URL, in the
    transaction that moves the cursor: a crash repeats the page, and a URL already queued (from
    any event, any instance) is left alone. Erasure events are handed to `on_erased` in that
    transaction too, so a forgotten prediction's files are deleted before the cursor passes it.
    None when another instance holds the cursor."""
    async with conn.transaction():
        cursor = await conn.fetchval("SELECT seq FROM archive_cursor FOR UPDATE SKIP LOCKED")
        if cursor is None:
            return None
        rows = await store.fetch_events(conn, after=cursor, limit=DISCOVER_BATCH)
        if not rows:
            return Discovered()
        jobs, erased = _new_jobs(rows, vault, policy)
        if jobs:
            await conn.execute(INSERT_JOBS, *(list(column) for column in zip(*jobs, strict=True)))
        if erased and on_erased is not None:
            await on_erased(conn, erased)
        await conn.execute("UPDATE archive_cursor SET seq = $1", rows[-1]["seq"])
    return Discovered(len(rows), len(jobs), tuple(erased))


async def claim(conn: Connection, vault: Vault) -> Job | None:
    """The next due job, locked until the caller's transaction ends."""
    row = await conn.fetchrow(CLAIM)
    return None if row is None else job_from(row, vault)


async def queue_stats(conn: Connection) -> tuple[int, float]:
    row = await conn.fetchrow(QUEUE_STATS)  # an aggregate: always one row
    assert row is not None
    return row["pending"], row["oldest"] or 0.0


async def remove_prediction(conn: Connection, prediction_ids: list[str]) -> list[str]:
    """Delete the jobs of forgotten predictions (waiting for one being downloaded); the object
    keys that no other job uses any more, for the caller to delete from the store."""
    rows = await conn.fetch(
        "DELETE FROM archive_jobs WHERE prediction_id = ANY($1::text[]) RETURNING object_key", prediction_ids
    )
    keys = sorted({r["object_key"] for r in rows if r["object_key"]})
    if not keys:
        return []
    shared = await conn.fetch(
        "SELECT DISTINCT object_key FROM archive_jobs WHERE object_key = ANY($1::text[])", keys
    )
    return sorted(set(keys) - {r["object_key"] for r in shared})
