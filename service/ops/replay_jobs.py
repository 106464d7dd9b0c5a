"""Replays started by the admin API run as background jobs, with a status to poll.

A replay to a slow or hanging target can take minutes (the probe held one request for 191 s);
the request that starts it waits a little and answers with the report when the replay is done
by then, or with the job to poll otherwise. Jobs live in the process that runs them; the last
MAX_KEPT finished ones are kept for their reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from service.db.store import iso
from service.ops.replay import Report

log = logging.getLogger("relay.replay")

MAX_KEPT = 100
RUNNING, DONE, FAILED, CANCELED = "running", "done", "failed", "canceled"


@dataclass
class ReplayJob:
    id: str
    report: Report = field(default_factory=Report)
    status: str = RUNNING
    error: str | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    task: asyncio.Task[Any] | None = field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "error": self.error,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "report": self.report.as_json(),
        }


class ReplayJobs:
    """The replay jobs of this process, by id."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, ReplayJob] = OrderedDict()

    def start(self, run: Callable[[Report], Awaitable[Any]]) -> ReplayJob:
        """Run `run(report)` as a job; the report fills in as the replay goes."""
        job = ReplayJob("rpl_" + secrets.token_hex(8))
        job.task = asyncio.create_task(self._run(job, run), name=f"relay-replay-{job.id}")
        self._jobs[job.id] = job
        self._forget_old()
        return job

    def get(self, job_id: str) -> ReplayJob | None:
        return self._jobs.get(job_id)

    def cancel(self, job: ReplayJob) -> None:
        if job.task is not None and not job.task.done():
            job.task.cancel()

    async def stop(self) -> None:
        """Cancel every running job (the process is stopping)."""
        tasks = [job.task for job in self._jobs.values() if job.task is not None and not job.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _run(job: ReplayJob, run: Callable[[Report], Awaitable[Any]]) -> None:
        try:
            await run(job.report)
            job.status = DONE
        except asyncio.CancelledError:
            job.status = CANCELED
            raise
        except Exception as exc:  # noqa: BLE001 - the job reports it; the class only (no URL, no body)
            job.status, job.error = FAILED, f"the replay stopped: {type(exc).__name__}"
            log.warning("replay job %s failed (%s)", job.id, type(exc).__name__)
        finally:
            job.finished_at = datetime.now(UTC)

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.status != RUNNING]
        for job in finished[: max(0, len(self._jobs) - MAX_KEPT)]:
            with contextlib.suppress(KeyError):
                del self._jobs[job.id]
