"""Output URLs in a delivered prediction, and what a downloaded file really is."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from service.core.hosts import HostPolicy

MAX_URLS = 1000  # per event: an output is a handful of files, never thousands
MAX_URL_LENGTH = 4096


def _strings(value: Any) -> Iterator[str]:
    """Every string inside `value` (lists and objects, iteratively), in document order."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))


def all_output_urls(prediction: Any) -> list[str]:
    """The distinct http(s) URLs in the prediction's `output`, in order (at most MAX_URLS)."""
    if not isinstance(prediction, dict):
        return []
    found: dict[str, None] = {}
    for text in _strings(prediction.get("output")):
        if len(text) <= MAX_URL_LENGTH and text.startswith(("https://", "http://")):
            found[text] = None
            if len(found) >= MAX_URLS:
                break
    return list(found)


def output_urls(prediction: Any, policy: HostPolicy) -> list[str]:
    """The output URLs that RELAY_ARCHIVE_HOSTS allows: the ones the archive downloads."""
    return [url for url in all_output_urls(prediction) if policy.allows(url)]


def url_hash(url: str) -> bytes:
    return hashlib.sha256(url.encode()).digest()


# What a file may be served as. Anything else is served as application/octet-stream: a stored
# file is served from Relay's own origin, and text/html or image/svg+xml there would run the
# uploader's script with the viewer's credentials.
SAFE_TYPES = {
    "image/png", "image/jpeg", "image/gif", "image/webp", "image/avif", "image/bmp",
    "video/mp4", "video/webm", "video/quicktime", "audio/mpeg", "audio/wav", "audio/x-wav",
    "audio/ogg", "audio/flac", "audio/mp4", "text/plain", "application/json", "application/zip",
    "model/gltf-binary", "application/octet-stream",
}  # fmt: skip
OCTET_STREAM = "application/octet-stream"

_SIGNATURES: list[tuple[int, bytes, str]] = [
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (8, b"WEBP", "image/webp"),
    (4, b"ftypavif", "image/avif"),
    (8, b"WAVE", "audio/wav"),
    (0, b"ID3", "audio/mpeg"),
    (0, b"OggS", "audio/ogg"),
    (0, b"fLaC", "audio/flac"),
    (0, b"\x1a\x45\xdf\xa3", "video/webm"),
    (4, b"ftyp", "video/mp4"),
    (0, b"glTF", "model/gltf-binary"),
    (0, b"PK\x03\x04", "application/zip"),
]


def sniff(head: bytes) -> str | None:
    """The type the first bytes prove, if they match a known signature."""
    for offset, signature, kind in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return kind
    return None


def content_type(declared: str | None, head: bytes) -> str:
    """The type to store and serve: what the bytes prove beats what the server claimed (a
    content type can lie); an unproven claim is kept only if it is safe to serve."""
    proven = sniff(head)
    if proven is not None:
        return proven
    claimed = (declared or "").split(";", 1)[0].strip().lower()
    return (
        claimed
        if claimed in SAFE_TYPES and not claimed.startswith(("image/", "video/", "audio/"))
        else OCTET_STREAM
    )
