"""Where archived files live, behind one interface: a local directory or S3-compatible storage.

Both go through `obstore` (one async API; its puts are atomic: a local put writes a staging file
and renames it, an S3 put is one PUT or a completed multipart upload), so no reader ever sees
half a file. S3 credentials, region and endpoint come from the standard AWS variables
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` for MinIO, R2 or
GCS, `AWS_ALLOW_HTTP=true` for a plain-http endpoint).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import obstore
from obstore.store import LocalStore, from_url

from service.core.errors import ConfigError

READ_CHUNK = 64 * 1024


class ArchiveStore:
    """Objects by key (`ab/abcdef…`): put a local file, test, stream, delete, list."""

    def __init__(self, url: str, backend: Any):
        self.url = url
        self._backend = backend

    async def put(self, key: str, source: Path) -> None:
        await obstore.put_async(self._backend, key, source)

    async def exists(self, key: str) -> bool:
        try:
            await obstore.head_async(self._backend, key)
        except FileNotFoundError:
            return False
        return True

    async def chunks(self, key: str, start: int = 0) -> AsyncIterator[bytes]:
        """The object's bytes from `start`, as they arrive (constant memory)."""
        options = {"range": {"offset": start}} if start else None
        result = await obstore.get_async(self._backend, key, options=options)  # type: ignore[arg-type]
        async for chunk in result.stream(min_chunk_size=READ_CHUNK):
            yield bytes(chunk)

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await obstore.delete_async(self._backend, key)

    async def keys(self, prefix: str | None = None) -> list[str]:
        listed = await obstore.list(self._backend, prefix=prefix).collect_async()
        return sorted(str(item["path"]) for item in listed)


def open_store(url: str) -> ArchiveStore | None:
    """The store RELAY_ARCHIVE names; None when it is `off`."""
    if url == "off":
        return None
    parts = urlsplit(url)
    if parts.scheme == "file":
        root = Path(unquote(parts.path))
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"RELAY_ARCHIVE directory {root} cannot be created: {error.strerror}") from None
        return ArchiveStore(url, LocalStore(prefix=root, mkdir=True))
    if parts.scheme == "s3":
        try:
            return ArchiveStore(url, from_url(url))
        except Exception as error:  # noqa: BLE001 - obstore raises its own classes for bad config
            raise ConfigError(f"RELAY_ARCHIVE {url[:80]!r} is not usable: {type(error).__name__}") from None
    raise ConfigError(f"RELAY_ARCHIVE must be file:///path, s3://bucket/prefix or off, got {url[:80]!r}")
