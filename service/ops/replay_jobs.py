"""Replays started by the admin API run as background jobs, with a status any instance answers.

A replay to a slow or hanging target can take minutes (the probe held one request for 191 s);
the request that starts it waits a little and answers with the report when the replay is done
by then, or with the job to poll otherwise. The process that runs a job keeps its row in
`replay_jobs` current (the report so far and a heartbeat, every SYNC_SECONDS) and reads back
`cancel_requested`, so GET and cancel work from any instance or worker behind a load balancer.
A job whose process died (no heartbeat for STALE_SECONDS) reads as failed; its report's
`resume_after` says where to start again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from service.core.errors import DatabaseUnavailable, RelayError
from service.db.store import iso
from service.ops.replay import Report

log = logging.getLogger("relay.replay")

SYNC_SECONDS = 1.0
STALE_SECONDS = 15.0
CANCEL_WAIT = 5.0
# Each running job holds a connection of the pool for its whole replay (the log's cursor), and
# one to a hanging target can run for minutes: a cap keeps replays from taking the pool that
# every other route needs.
MAX_RUNNING = 3
RUNNING, DONE, FAILED, CANCELED = "running", "done", "failed", "canceled"
STOPPED = "the Relay process running it stopped; start again after report.resume_after"

INSERT = "INSERT INTO replay_jobs (id, report) VALUES ($1, $2::jsonb)"
PRUNE = "DELETE FROM replay_jobs WHERE finished_at < now() - interval '7 days'"
SYNC = """
UPDATE replay_jobs SET report = $2::jsonb, heartbeat_at = now() WHERE id = $1
RETURNING cancel_requested
"""
FINISH = """
UPDATE replay_jobs SET status = $2, error = $3, report = $4::jsonb, finished_at = now(),
       heartbeat_at = now()
WHERE id = $1
"""
REQUEST_CANCEL = "UPDATE replay_jobs SET cancel_requested = true WHERE id = $1"
# A running job without a heartbeat for STALE_SECONDS lost its process.
READ = f"""
SELECT id, report, started_at, finished_at,
       CASE WHEN stale THEN '{FAILED}' ELSE status END AS status,
       CASE WHEN stale THEN '{STOPPED}' ELSE error END AS error
FROM (SELECT *, status = '{RUNNING}' AND heartbeat_at < now() - $2::float8 * interval '1 second' AS stale
      FROM replay_jobs WHERE id = $1) AS job
"""


class TooManyReplays(RelayError):
    status = 429
    code = "TOO_MANY_REPLAYS"

    def __init__(self) -> None:
        super().__init__(
            f"{MAX_RUNNING} replays are already running in this Relay process; "
            "wait for one to end (or cancel one) and retry",
            headers={"Retry-After": "5"},
        )


@dataclass
class ReplayJob:
    """A job run by this process: what the request that started it waits on."""

    id: str
    report: Report = field(default_factory=Report)
    status: str = RUNNING
    error: str | None = None
    task: asyncio.Task[Any] | None = field(default=None, repr=False)


def job_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "status": row["status"],
        "error": row["error"],
        "started_at": iso(row["started_at"]),
        "finished_at": iso(row["finished_at"]),
        "report": json.loads(row["report"]),
    }


class ReplayJobs:
    """Starts replay jobs in this process; reads and cancels any instance's."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._local: dict[str, ReplayJob] = {}

    async def start(self, run: Callable[[Report], Awaitable[Any]]) -> ReplayJob:
        """Record the job, then run `run(report)`; the report fills in as the replay goes."""
        if len(self._local) >= MAX_RUNNING:
            raise TooManyReplays()
        job = ReplayJob("rpl_" + secrets.token_hex(8))
        self._local[job.id] = job  # counted at once: concurrent requests see it
        try:
            async with asyncio.timeout(CANCEL_WAIT), self.pool.acquire() as conn:
                await conn.execute(PRUNE)
                await conn.execute(INSERT, job.id, json.dumps(job.report.as_json()))
        except BaseException as error:
            del self._local[job.id]
            if isinstance(error, TimeoutError):
                raise DatabaseUnavailable() from None
            raise
        job.task = asyncio.create_task(self._run(job, run), name=f"relay-replay-{job.id}")
        return job

    async def read(self, job_id: str) -> dict[str, Any] | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(READ, job_id, STALE_SECONDS)
        return None if row is None else job_json(row)

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Ask the job's process to stop it (at once when it is this one), wait a little for the
        answer, and return the job as it then is; None for an unknown id."""
        async with self.pool.acquire() as conn:
            await conn.execute(REQUEST_CANCEL, job_id)
        local = self._local.get(job_id)
        if local is not None and local.task is not None:
            local.task.cancel()
            await asyncio.wait({local.task}, timeout=CANCEL_WAIT)
        else:
            deadline = asyncio.get_running_loop().time() + CANCEL_WAIT
            while (job := await self.read(job_id)) is not None and job["status"] == RUNNING:
                if asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(SYNC_SECONDS / 4)
        return await self.read(job_id)

    async def stop(self) -> None:
        """Cancel every job this process runs (it is stopping); each records `canceled`."""
        tasks = [job.task for job in self._local.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, job: ReplayJob, run: Callable[[Report], Awaitable[Any]]) -> None:
        try:
            await self._drive(job, asyncio.ensure_future(run(job.report)))
            job.status = DONE
        except asyncio.CancelledError:
            job.status = CANCELED
            raise
        except Exception as exc:  # noqa: BLE001 - the job reports it; the class only (no URL, no body)
            job.status, job.error = FAILED, f"the replay stopped: {type(exc).__name__}"
            log.warning("replay job %s failed (%s)", job.id, type(exc).__name__)
        finally:
            self._local.pop(job.id, None)
            await self._record(FINISH, job.id, job.status, job.error, json.dumps(job.report.as_json()))

    async def checkpoint(self, job: ReplayJob) -> bool:
        """Write the report so far and the heartbeat; whether a cancel was asked for."""
        return bool(await self._record(SYNC, job.id, json.dumps(job.report.as_json())))

    async def _drive(self, job: ReplayJob, work: asyncio.Future[Any]) -> None:
        """Wait for the replay, writing its report and heartbeat every SYNC_SECONDS and stopping
        it when another instance asked for a cancel."""
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=SYNC_SECONDS)
                if not work.done() and await self.checkpoint(job):
                    work.cancel()
            await work
        finally:
            if not work.done():  # stopped from here: let it release its connection first
                work.cancel()
                await asyncio.wait({work}, timeout=CANCEL_WAIT)

    async def _record(self, statement: str, *args: Any) -> Any:
        """Write the job's row; a database that is down only delays it (logged, never raised)."""
        try:
            async with asyncio.timeout(CANCEL_WAIT), self.pool.acquire() as conn:
                return await conn.fetchval(statement, *args)
        except Exception as exc:  # noqa: BLE001 - see above (a timeout included)
            log.warning("could not record replay job %s (%s)", args[0], type(exc).__name__)
            return None
