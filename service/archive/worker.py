"""The archiver: discovery from the log, and a bounded number of downloads at once.

Each download streams into a spool file while hashing it (constant memory, capped size), is
sealed chunk by chunk under the prediction's data key when encryption is on, and is put into
the store under its SHA-256 only once complete. The job's row stays locked for the whole
attempt (jobs.py), so the store never receives the same URL twice, and a put of a key already
there is skipped: content addressing makes a repeat harmless anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx

from service.archive import jobs
from service.archive.jobs import Job
from service.archive.stores import ArchiveStore
from service.archive.urls import content_type
from service.core import crypto
from service.core.hosts import HostPolicy
from service.core.metrics import (
    ARCHIVE_BYTES,
    ARCHIVE_FAILURES,
    ARCHIVE_FILES,
    ARCHIVE_OLDEST,
    ARCHIVE_QUEUE,
    ARCHIVE_RETRIES,
)
from service.core.pace import Pace
from service.core.retry import exponential
from service.db.connection import Connection
from service.db.vault import Vault
from service.net.guard import GuardedClient, Refused, TooLarge, Unresolved, capped_chunks

log = logging.getLogger("relay.archive")

POLL_SECONDS = 1.0
STATS_SECONDS = 5.0
TOTAL_TIMEOUT = 600.0  # one download, start to end: a server dripping bytes cannot hold a slot
RETRY_CAP = 300.0
STALE_SPOOL = timedelta(days=1)
URGENT = timedelta(minutes=15)  # a job this close to its URL's expiry is never held back
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
WRITE_CHUNK = 1024 * 1024


class Retry(Exception):
    """The attempt failed in a way that may pass (timeout, 5xx): try again later."""


class Failed(Exception):
    """The attempt failed for good (refused, too large, 404): the job ends `failed`."""


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    size: int
    content_type: str


@dataclass(frozen=True)
class Tuning:
    """Knobs that tests and benches turn; the defaults are the service's."""

    concurrency: int = 4
    retry_base: float = 2.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    poll: float = POLL_SECONDS
    # While this process commits more than `busy_ingest` deliveries a second, downloads start
    # at most `busy_files_per_second` a second: ingest has milliseconds, a file has an hour.
    busy_ingest: int = 250
    busy_files_per_second: float = 20.0


def object_key(sha256: str, job: Job) -> str:
    """Clear files are shared by content; a sealed one belongs to its prediction's key, so
    forgetting one prediction never removes another's file."""
    if job.data_key is None:
        return f"{sha256[:2]}/{sha256}"
    owner = hashlib.sha256(job.prediction_id.encode()).hexdigest()[:16]
    return f"{sha256[:2]}/{sha256}.{owner}"


def retry_delay(attempts: int, base: float) -> float:
    return exponential(attempts, base, RETRY_CAP)  # core.retry: the one retry policy


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_spool(spool: Path) -> int:
    """Remove spool files left by dead processes (a `kill -9` mid-download) on this machine,
    and any older than a day (from another machine sharing the directory)."""
    removed = 0
    host = socket.gethostname()
    old = datetime.now(UTC) - STALE_SPOOL
    for path in spool.glob("*.part"):
        owner_host, pid_text = _spool_owner(path.name)
        mine_but_dead = owner_host == host and pid_text.isdigit() and not _pid_alive(int(pid_text))
        try:
            stale = datetime.fromtimestamp(path.stat().st_mtime, UTC) < old
            if mine_but_dead or stale:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def _spool_owner(name: str) -> tuple[str, str]:
    host, _, tail = name.partition("~")
    pid, _, _ = tail.partition("~")
    return host, pid


class Archiver:
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: ArchiveStore,
        vault: Vault,
        policy: HostPolicy,
        spool: Path,
        max_bytes: int,
        tuning: Tuning | None = None,
        ingest_rate: Callable[[], int] = lambda: 0,
    ):
        self.pool, self.store, self.vault, self.policy = pool, store, vault, policy
        self.spool, self.max_bytes = spool, max_bytes
        self.tuning = tuning or Tuning()
        self.ingest_rate = ingest_rate  # deliveries a second committed by this process
        self.pace = Pace(self.tuning.busy_files_per_second)
        self.client = GuardedClient(
            policy,
            connect_timeout=self.tuning.connect_timeout,
            read_timeout=self.tuning.read_timeout,
            max_connections=self.tuning.concurrency,
        )
        self._wake = asyncio.Event()
        self.stored = 0

    async def run(self) -> None:
        """Discovery, the download slots and the queue gauges, until cancelled."""
        self.spool.mkdir(parents=True, exist_ok=True)
        if removed := sweep_spool(self.spool):
            log.info("archive: removed %d partial download(s) left by a stopped process", removed)
        loops: list[tuple[str, Callable[[], Awaitable[float]]]] = [
            ("discover", self.discover_pass),
            ("stats", self.stats_pass),
        ]
        loops += [(f"slot {n}", self.slot_pass) for n in range(self.tuning.concurrency)]
        try:
            await asyncio.gather(*(self._forever(name, step) for name, step in loops))
        finally:
            await self.client.aclose()

    async def _forever(self, name: str, step: Callable[[], Awaitable[float]]) -> None:
        """Run `step` again and again, sleeping what it asks; a failure is logged and retried,
        so a database outage or a store error never ends the loop."""
        while True:
            try:
                pause = await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "archive %s failed: %s",
                    name,
                    type(exc).__name__,
                    exc_info=log.isEnabledFor(logging.DEBUG),
                )
                pause = max(self.tuning.poll, 1.0)
            if pause:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)

    async def discover_pass(self) -> float:
        async with self.pool.acquire() as conn:
            found = await jobs.discover(conn, self.vault, self.policy, self.forget)
        if found is None or not found.events:
            return self.tuning.poll
        if found.jobs:
            self._wake.set()
        return 0.0 if found.events >= jobs.DISCOVER_BATCH else self.tuning.poll

    async def forget(self, conn: Connection, prediction_ids: list[str]) -> int:
        return await forget_files(conn, self.store, prediction_ids)

    async def stats_pass(self) -> float:
        async with self.pool.acquire() as conn:
            pending, oldest = await jobs.queue_stats(conn)
        ARCHIVE_QUEUE.set(pending)
        ARCHIVE_OLDEST.set(oldest)
        return STATS_SECONDS

    async def slot_pass(self) -> float:
        """One job, if one is due: claimed, attempted and recorded in one transaction."""
        async with self.pool.acquire() as conn, conn.transaction():
            job = await jobs.claim(conn, self.vault)
            if job is None:
                return self.tuning.poll
            await self.yield_to_ingest(job)
            await self.attempt(conn, job)
        return 0.0

    async def yield_to_ingest(self, job: Job) -> None:
        """While webhooks pour in, space the downloads out: they take the CPU a webhook's
        answer waits for. A job near its URL's expiry goes at once."""
        if self.ingest_rate() < self.tuning.busy_ingest:
            return
        if job.give_up_at - datetime.now(UTC) > URGENT:
            await self.pace.wait()

    async def attempt(self, conn: Connection, job: Job) -> None:
        if job.encrypted and job.data_key is None:  # forgotten since it was queued
            await conn.execute("DELETE FROM archive_jobs WHERE url_hash = $1", job.url_hash)
            return
        try:
            fetched, key = await self._fetch_and_keep(job)
        except Failed as failure:
            await self._fail(conn, job, str(failure))
            return
        except Retry as retry:
            await self._retry(conn, job, str(retry))
            return
        await conn.execute(jobs.STORED, job.url_hash, fetched.sha256, fetched.size, fetched.content_type, key)
        ARCHIVE_FILES.inc()
        ARCHIVE_BYTES.inc(fetched.size)
        self.stored += 1
        log.debug(
            "archive: stored job %s of prediction %s (%d bytes)", job.id, job.prediction_id, fetched.size
        )

    async def _fetch_and_keep(self, job: Job) -> tuple[Fetched, str]:
        """Download and store; anything unforeseen (a bug, an odd library error) is retried with
        backoff like a network error, and logged: never a hot loop on one job."""
        try:
            fetched = await self.download(job)
            try:
                return fetched, await self.keep(job, fetched)
            finally:
                fetched.path.unlink(missing_ok=True)
        except (Failed, Retry):
            raise
        except Exception as error:  # noqa: BLE001 - see above
            log.warning("archive: job %s failed unexpectedly: %s", job.id, type(error).__name__)
            raise Retry(f"unexpected error ({type(error).__name__})") from None

    async def _fail(self, conn: Connection, job: Job, reason: str) -> None:
        await conn.execute(jobs.FAILED, job.url_hash, reason)
        ARCHIVE_FAILURES.labels(reason.split(" (", 1)[0][:40]).inc()
        log.info("archive: job %s of prediction %s failed: %s", job.id, job.prediction_id, reason)

    async def _retry(self, conn: Connection, job: Job, reason: str) -> None:
        attempts = job.attempts + 1
        delay = retry_delay(attempts, self.tuning.retry_base)
        if datetime.now(UTC) + timedelta(seconds=delay) > job.give_up_at:
            await self._fail(conn, job, f"{reason} (gave up after {attempts} attempts: the URL has expired)")
            return
        await conn.execute(jobs.RETRY, job.url_hash, reason, delay)
        ARCHIVE_RETRIES.inc()

    async def download(self, job: Job) -> Fetched:
        """The URL's body in a spool file, with its SHA-256, size and proven content type."""
        spool = self.spool / f"{socket.gethostname()}~{os.getpid()}~{secrets.token_hex(8)}.part"
        try:
            async with asyncio.timeout(TOTAL_TIMEOUT):
                return await self._download(job.url, spool)
        except (Failed, Retry):
            spool.unlink(missing_ok=True)
            raise
        except TimeoutError:
            spool.unlink(missing_ok=True)
            raise Retry("timeout") from None
        except BaseException:
            spool.unlink(missing_ok=True)
            raise

    async def _download(self, url: str, spool: Path) -> Fetched:
        try:
            async with self.client.stream(url) as response:
                _check_status(response.status_code)
                digest, size, head = hashlib.sha256(), 0, b""
                with spool.open("wb") as out:
                    async for chunk in capped_chunks(response, self.max_bytes):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        if len(head) < 64:
                            head += chunk[:64]
                declared = response.headers.get("content-type")
        except Unresolved as unresolved:  # DNS fails for a while too: retried until the URL expires
            raise Retry(unresolved.reason) from None
        except Refused as refused:
            raise Failed(refused.reason) from None
        except httpx.InvalidURL:
            raise Failed("the URL is not valid") from None
        except TooLarge:
            raise Failed(f"too large (over RELAY_ARCHIVE_MAX_BYTES = {self.max_bytes} bytes)") from None
        except httpx.TimeoutException:
            raise Retry("timeout") from None
        except httpx.RemoteProtocolError:
            raise Retry("the connection closed before the whole body arrived") from None
        except httpx.TransportError as error:
            raise Retry(f"connection failed ({type(error).__name__})") from None
        return Fetched(spool, digest.hexdigest(), size, content_type(declared, head))

    async def keep(self, job: Job, fetched: Fetched) -> str:
        """Put the file in the store (sealed when the job is) unless it is there already."""
        key = object_key(fetched.sha256, job)
        try:
            if await self.store.exists(key):
                return key
            if job.data_key is None:
                await self.store.put(key, fetched.path)
                return key
            sealed = fetched.path.with_suffix(".sealed.part")
            try:
                await asyncio.to_thread(seal_file, fetched, job, sealed)
                await self.store.put(key, sealed)
            finally:
                sealed.unlink(missing_ok=True)
        except Exception as error:  # noqa: BLE001 - obstore raises its own classes for S3 errors
            raise Retry(f"the store failed ({type(error).__name__})") from None
        return key


def _check_status(status: int) -> None:
    if 200 <= status < 300 and status != 206:
        return
    if 300 <= status < 400:
        raise Failed(f"redirect refused (HTTP {status}); Relay never follows redirects")
    if status in RETRY_STATUSES:
        raise Retry(f"HTTP {status}")
    if status in (404, 410):
        raise Failed(f"HTTP {status}: the file is gone")
    raise Failed(f"HTTP {status}")


def seal_file(fetched: Fetched, job: Job, target: Path) -> None:
    """Write the spool file sealed chunk by chunk (crypto.FILE_CHUNK) under the job's data key."""
    assert job.data_key is not None
    count = crypto.file_chunk_count(fetched.size)
    with fetched.path.open("rb") as source, target.open("wb") as out:
        for index in range(count):
            chunk = source.read(crypto.FILE_CHUNK)
            final = index == count - 1
            out.write(
                crypto.seal_file_chunk(job.data_key, chunk, job.prediction_id, fetched.sha256, index, final)
            )


async def forget_files(conn: Connection, store: ArchiveStore, prediction_ids: list[str]) -> int:
    """Delete forgotten predictions' jobs and their files: rows first (in a transaction, so a
    crash before the files are gone leaves the rows for the next pass), then the objects."""
    async with conn.transaction():
        keys = await jobs.remove_prediction(conn, prediction_ids)
        for key in keys:
            await store.delete(key)
    if keys:
        log.info("archive: deleted %d file(s) of %d forgotten prediction(s)", len(keys), len(prediction_ids))
    return len(keys)
