"""What `relay archive status|retry` and `relay forget` ask of the archive (no HTTP server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from service.archive.jobs import job_from
from service.archive.stores import ArchiveStore
from service.archive.worker import forget_files
from service.db.connection import Connection
from service.db.vault import Vault

SUMMARY = """
SELECT status, count(*) AS jobs, coalesce(sum(size), 0) AS bytes,
       extract(epoch FROM now() - min(created_at))::float8 AS oldest
FROM archive_jobs GROUP BY status
"""
JOB_COLUMNS = """
SELECT j.url_hash, j.prediction_id, j.url, j.encrypted, j.attempts, j.give_up_at, j.status, j.reason,
       j.sha256, j.size, j.content_type, j.next_at, j.finished_at,
       CASE WHEN j.encrypted THEN (SELECT k.wrapped FROM data_keys k
                                   WHERE k.prediction_id = j.prediction_id) END AS data_key
FROM archive_jobs j
"""
# A retried job gets a fresh window of retries: the URL may be dead by now, and then the job
# ends failed again with the new reason. A job id is a hex prefix of the URL's hash, compared as
# text: never a LIKE pattern, and never empty (which would match every failed job).
RETRY_WINDOW_MINUTES = 10
RETRY = """
UPDATE archive_jobs SET status = 'pending', attempts = 0, next_at = now(), finished_at = NULL,
       give_up_at = greatest(give_up_at, now() + $2::int * interval '1 minute')
WHERE status = 'failed'
  AND (prediction_id = $1 OR ($1 ~ '^[0-9a-f]+$' AND starts_with(encode(url_hash, 'hex'), $1)))
"""
LIST_LIMIT = 200
ERASED = (
    "SELECT DISTINCT prediction_id FROM events WHERE source = 'erasure' AND prediction_id = ANY($1::text[])"
)


@dataclass(frozen=True)
class Summary:
    counts: dict[str, int]
    stored_bytes: int
    oldest_pending: float

    def lines(self) -> list[str]:
        counts = ", ".join(f"{self.counts.get(s, 0)} {s}" for s in ("pending", "stored", "failed"))
        lines = [f"archive: {counts}; {self.stored_bytes:,} bytes stored"]
        if self.counts.get("pending"):
            lines.append(f"oldest pending job: {self.oldest_pending:.0f} s old")
        return lines


async def summary(conn: Connection) -> Summary:
    rows = await conn.fetch(SUMMARY)
    by_status = {r["status"]: r for r in rows}
    pending = by_status.get("pending")
    return Summary(
        {s: r["jobs"] for s, r in by_status.items()},
        by_status["stored"]["bytes"] if "stored" in by_status else 0,
        pending["oldest"] if pending is not None else 0.0,
    )


async def list_jobs(
    conn: Connection, vault: Vault, *, prediction_id: str | None, failed: bool
) -> list[dict[str, Any]]:
    """Jobs of one prediction and/or failed ones, newest first; each URL shown by its origin only
    (a full output URL is the prediction's content)."""
    clauses, args = [], []
    if prediction_id is not None:
        args.append(prediction_id)
        clauses.append(f"j.prediction_id = ${len(args)}")
    if failed:
        clauses.append("j.status = 'failed'")
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = await conn.fetch(f"{JOB_COLUMNS} {where} ORDER BY j.created_at DESC LIMIT {LIST_LIMIT}", *args)
    listed = []
    for row in rows:
        job = job_from(row, vault)
        origin = urlsplit(job.url)
        listed.append(
            {
                "id": job.id,
                "prediction_id": job.prediction_id,
                "origin": f"{origin.scheme}://{origin.netloc}" if job.url else "(forgotten)",
                "status": row["status"],
                "attempts": row["attempts"],
                "sha256": row["sha256"],
                "size": row["size"],
                "content_type": row["content_type"],
                "reason": row["reason"],
            }
        )
    return listed


def job_line(job: dict[str, Any]) -> str:
    if job["status"] == "stored":
        detail = f"{job['size']:,} bytes {job['content_type']} sha256 {job['sha256']}"
    elif job["status"] == "failed":
        detail = f"failed: {job['reason']}"
    else:
        detail = f"pending after {job['attempts']} attempt(s)" + (
            f": {job['reason']}" if job["reason"] else ""
        )
    return f"{job['id']}  {job['prediction_id']}  {job['origin']}  {detail}"


async def retry(conn: Connection, target: str) -> int:
    """Re-queue the failed jobs of a prediction, or the one job whose id starts with `target`."""
    done = await conn.execute(RETRY, target, RETRY_WINDOW_MINUTES)
    return int(done.split()[-1])


async def forget(conn: Connection, store: ArchiveStore | None, prediction_ids: list[str]) -> int:
    """Delete the stored files of predictions that are forgotten (they have an erasure event)."""
    if store is None:
        return 0
    erased = await conn.fetch(ERASED, prediction_ids)
    ids = [r["prediction_id"] for r in erased]
    return await forget_files(conn, store, ids) if ids else 0
