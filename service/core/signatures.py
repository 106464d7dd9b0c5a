"""Standard Webhooks signing and verification (the scheme Replicate uses). Pure functions.

Every malformed header becomes the same kind of `RelayError` (401), never a ValueError.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping

from service.core.errors import InvalidSignature, MissingSignature, TimestampOutOfTolerance

MAX_WEBHOOK_ID_LENGTH = 256
MAX_TIMESTAMP_DIGITS = 12


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `v1,<base64>` signature for one delivery."""
    content = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(key: bytes, webhook_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, webhook_id, timestamp, body),
        "content-type": "application/json",
    }


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if not value:
        raise MissingSignature(f"the {name} header is missing; is this request from Replicate?")
    return value


def _parse_timestamp(raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or len(raw) > MAX_TIMESTAMP_DIGITS:
        raise InvalidSignature("webhook-timestamp must be Unix seconds (digits only)")
    return int(raw)


def _candidate_signatures(raw: str) -> list[bytes]:
    candidates = []
    for entry in raw.split(" "):
        version, _, encoded = entry.partition(",")
        if version != "v1" or not encoded:
            continue
        try:
            candidates.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return candidates


def verify(
    headers: Mapping[str, str],
    body: bytes,
    keys: Iterable[bytes],
    tolerance: int,
    now: float | None = None,
) -> tuple[str, int]:
    """Check a delivery's signature and age; return its (webhook_id, timestamp).

    Accepts when any `v1` signature matches any key (constant-time) and the timestamp is within
    `tolerance` seconds of now, past or future.
    """
    webhook_id = _header(headers, "webhook-id")
    timestamp_raw = _header(headers, "webhook-timestamp")
    signature_raw = _header(headers, "webhook-signature")
    if len(webhook_id) > MAX_WEBHOOK_ID_LENGTH or not webhook_id.isprintable():
        raise InvalidSignature(f"webhook-id must be at most {MAX_WEBHOOK_ID_LENGTH} printable chars")
    timestamp = _parse_timestamp(timestamp_raw)
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        raise TimestampOutOfTolerance(
            f"webhook-timestamp is more than {tolerance}s away from now; "
            "check the sender's clock or RELAY_WEBHOOK_TOLERANCE"
        )
    candidates = _candidate_signatures(signature_raw)
    if not candidates:
        raise InvalidSignature("webhook-signature holds no v1,<base64> signature")
    content = f"{webhook_id}.{timestamp_raw}.".encode() + body
    for key in keys:
        expected = hmac.new(key, content, hashlib.sha256).digest()
        # Compare against every candidate so timing does not reveal which one matched.
        matched = [hmac.compare_digest(expected, c) for c in candidates]
        if any(matched):
            return webhook_id, timestamp
    raise InvalidSignature("no webhook-signature matches a configured REPLICATE_WEBHOOK_SECRET")
