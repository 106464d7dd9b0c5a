"""Reading the archive: a prediction's `archive` list, and a stored file for `GET /files/…`."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from service.archive.stores import ArchiveStore
from service.archive.urls import all_output_urls, output_urls, url_hash
from service.core import crypto
from service.core.hosts import HostPolicy
from service.db.connection import Connection
from service.db.vault import Vault

SHA256 = re.compile(r"[0-9a-f]{64}")

JOBS_BY_URL = """
SELECT url_hash, status, reason, sha256, size, content_type
FROM archive_jobs WHERE url_hash = ANY($1::bytea[])
"""

# The stored copy of a file that one of these URLs (a prediction's output) points at; with no
# URLs given (the admin), any stored copy.
FILE_COPY = """
SELECT j.prediction_id, j.sha256, j.size, j.content_type, j.object_key, j.encrypted,
       CASE WHEN j.encrypted THEN (SELECT k.wrapped FROM data_keys k
                                   WHERE k.prediction_id = j.prediction_id) END AS data_key
FROM archive_jobs j
WHERE j.sha256 = $1 AND j.status = 'stored' AND ($2::bytea[] IS NULL OR j.url_hash = ANY($2::bytea[]))
ORDER BY j.encrypted, j.finished_at
LIMIT 1
"""


def entry(url: str, row: asyncpg.Record | None) -> dict[str, Any]:
    """One item of `archive`: pending until stored or failed."""
    if row is None or row["status"] == "pending":
        return {"url": url, "status": "pending"}
    if row["status"] == "failed":
        return {"url": url, "status": "failed", "reason": row["reason"]}
    sha = row["sha256"]
    return {
        "url": url,
        "status": "stored",
        "file": f"/files/{sha}",
        "sha256": sha,
        "size": row["size"],
        "content_type": row["content_type"],
    }


async def archive_entries(conn: Connection, prediction: Any, policy: HostPolicy) -> list[dict[str, Any]]:
    """The `archive` list for a prediction object: each allowed output URL and its copy."""
    urls = output_urls(prediction, policy)
    if not urls:
        return []
    rows = await conn.fetch(JOBS_BY_URL, [url_hash(u) for u in urls])
    by_hash = {bytes(r["url_hash"]): r for r in rows}
    return [entry(url, by_hash.get(url_hash(url))) for url in urls]


@dataclass(frozen=True)
class StoredFile:
    prediction_id: str
    sha256: str
    size: int
    content_type: str
    object_key: str
    data_key: bytes | None  # set when the object is sealed

    @property
    def sealed(self) -> bool:
        return self.data_key is not None


async def find_copy(
    conn: Connection, sha256: str, vault: Vault, output_of: Any = None, *, admin: bool = False
) -> StoredFile | None:
    """A stored file with this SHA-256: for the admin any copy, otherwise only one that the
    given prediction object's output points at. None if there is none (or it is forgotten)."""
    hashes = None if admin else [url_hash(u) for u in all_output_urls(output_of)]
    if hashes == []:
        return None
    row = await conn.fetchrow(FILE_COPY, sha256, hashes)
    if row is None:
        return None
    data_key = None
    if row["encrypted"]:
        if row["data_key"] is None:
            return None
        data_key = vault.data_key(row["prediction_id"], row["data_key"])
    return StoredFile(
        row["prediction_id"], row["sha256"], row["size"], row["content_type"], row["object_key"], data_key
    )


RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def byte_span(header: str, size: int) -> tuple[int, int] | None:
    """[start, end) of a single `Range: bytes=…` request; None when it cannot be satisfied.
    Several ranges are not supported (the caller sends the whole file instead)."""
    match = RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last N bytes
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), min(size, int(last) + 1) if last else size
    return (start, end) if start < end else None


async def file_chunks(
    store: ArchiveStore, stored: StoredFile, span: tuple[int, int] | None = None
) -> AsyncIterator[bytes]:
    """The file's plaintext, streamed: sealed objects are opened chunk by chunk. A `span`
    ([start, end)) is for clear files only: a sealed one is always read whole."""
    if not stored.sealed:
        async for chunk in store.chunks(stored.object_key, span):
            yield chunk
        return
    assert stored.data_key is not None
    count = crypto.file_chunk_count(stored.size)
    buffer, index = b"", 0
    async for piece in store.chunks(stored.object_key):
        buffer += piece
        while len(buffer) >= crypto.SEALED_FILE_CHUNK and index < count - 1:
            record, buffer = buffer[: crypto.SEALED_FILE_CHUNK], buffer[crypto.SEALED_FILE_CHUNK :]
            yield _open(stored, record, index, final=False)
            index += 1
    if index != count - 1:
        raise crypto.Unreadable("the sealed file is truncated")
    yield _open(stored, buffer, index, final=True)


def _open(stored: StoredFile, record: bytes, index: int, *, final: bool) -> bytes:
    assert stored.data_key is not None
    return crypto.open_file_chunk(stored.data_key, record, stored.prediction_id, stored.sha256, index, final)
