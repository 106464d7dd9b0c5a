"""The webhook URL of a batch item: Relay's webhook URL plus `?batch_item=<batch>.<index>.<mac>`.

Replicate sends every delivery of a prediction to the URL it was created with, so a delivery
names its item even when the create's answer (with the prediction id) never reached Relay. The
MAC (HMAC-SHA256 under a key derived from RELAY_SUBSCRIBE_KEY, shared by every instance) keeps
anyone from binding a prediction to an item they only guessed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from urllib.parse import urlencode

QUERY_NAME = "batch_item"
MAC_BYTES = 12
REF = re.compile(r"^(b_[0-9a-f]{32})\.([0-9]{1,5})\.([A-Za-z0-9_-]{16})$")


@dataclass(frozen=True)
class ItemRef:
    batch_id: str
    index: int


def _mac(key: bytes, batch_id: str, index: int) -> str:
    digest = hmac.new(key, f"{batch_id}.{index}".encode(), hashlib.sha256).digest()[:MAC_BYTES]
    return base64.urlsafe_b64encode(digest).decode()


def link_key(subscribe_key: str) -> bytes:
    """A key for item links only, so a link's MAC never doubles as a token signature."""
    return hmac.new(subscribe_key.encode(), b"relay batch item links", hashlib.sha256).digest()


def item_webhook_url(webhook_url: str, key: bytes, ref: ItemRef) -> str:
    value = f"{ref.batch_id}.{ref.index}.{_mac(key, ref.batch_id, ref.index)}"
    return f"{webhook_url}?{urlencode({QUERY_NAME: value})}"


def parse_ref(value: str, key: bytes) -> ItemRef | None:
    """The item a `batch_item` value names, or None when it is malformed or its MAC is wrong."""
    match = REF.match(value)
    if match is None:
        return None
    batch_id, index = match.group(1), int(match.group(2))
    if not hmac.compare_digest(match.group(3), _mac(key, batch_id, index)):
        return None
    return ItemRef(batch_id, index)
