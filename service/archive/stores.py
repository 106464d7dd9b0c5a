"""Where archived files live, behind one interface: a local directory or S3-compatible storage.

Both go through `obstore` (one async API; its puts are atomic: a local put writes a staging file
and renames it, an S3 put is one PUT or a completed multipart upload), so no reader ever sees
half a file. S3 credentials, region and endpoint come from the standard AWS variables
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` for MinIO, R2 or
GCS, `AWS_ALLOW_HTTP=true` for a plain-http endpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import obstore
from obstore.store import LocalStore, from_url

from service.core.errors import ConfigError

READ_CHUNK = 64 * 1024


# S3 multipart parts (5 MiB is S3's smallest) and how many are in flight: an upload holds
# about PART_SIZE * PARTS_IN_FLIGHT bytes in memory, whatever the file's size.
PART_SIZE = 5 * 1024 * 1024
PARTS_IN_FLIGHT = 2


class ArchiveStore:
    """Objects by key (`ab/abcdef…`): put a local file, test, stream, delete, list."""

    def __init__(self, url: str, backend: Any):
        self.url = url
        self._backend = backend

    async def put(self, key: str, source: Path) -> None:
        """Store a complete local file under `key`, atomically. `source` may be consumed."""
        await obstore.put_async(
            self._backend, key, source, chunk_size=PART_SIZE, max_concurrency=PARTS_IN_FLIGHT
        )

    async def exists(self, key: str) -> bool:
        try:
            await obstore.head_async(self._backend, key)
        except FileNotFoundError:
            return False
        return True

    async def chunks(self, key: str, span: tuple[int, int] | None = None) -> AsyncIterator[bytes]:
        """The object's bytes (those in [start, end) with a `span`), as they arrive: constant memory."""
        options = {"range": span} if span is not None else None
        result = await obstore.get_async(self._backend, key, options=options)  # type: ignore[arg-type]
        async for chunk in result.stream(min_chunk_size=READ_CHUNK):
            yield bytes(chunk)

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await obstore.delete_async(self._backend, key)

    async def keys(self, prefix: str | None = None) -> list[str]:
        listed = await obstore.list(self._backend, prefix=prefix).collect_async()
        return sorted(str(item["path"]) for item in listed)


class DirectoryStore(ArchiveStore):
    """A local directory: a put is a rename of the finished spool file into place (atomic, and
    no copy when both are on one filesystem; otherwise a copy to a temporary name beside the
    target first). Reads, lists and deletes go through obstore's LocalStore."""

    def __init__(self, url: str, root: Path):
        super().__init__(url, LocalStore(prefix=root, mkdir=True))
        self.root = root

    async def put(self, key: str, source: Path) -> None:
        await asyncio.to_thread(self._move, key, source)

    def _move(self, key: str, source: Path) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
            return
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
        staging = target.with_name(f".{target.name}.{secrets.token_hex(6)}.staging")
        try:
            shutil.copyfile(source, staging)
            with staging.open("rb") as written:
                os.fsync(written.fileno())
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)


def open_store(url: str, name: str = "RELAY_ARCHIVE") -> ArchiveStore | None:
    """The store RELAY_ARCHIVE (or the option `name`) names; None when it is `off`."""
    if url == "off":
        return None
    parts = urlsplit(url)
    if parts.scheme == "file":
        root = Path(unquote(parts.path))
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{name} directory {root} cannot be created: {error.strerror}") from None
        return DirectoryStore(url, root)
    if parts.scheme == "s3":
        try:
            return ArchiveStore(url, from_url(url))
        except Exception as error:  # noqa: BLE001 - obstore raises its own classes for bad config
            raise ConfigError(f"{name} {url[:80]!r} is not usable: {type(error).__name__}") from None
    raise ConfigError(f"{name} must be file:///path, s3://bucket/prefix or off, got {url[:80]!r}")
