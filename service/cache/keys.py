"""What a cached answer is keyed by: the caller's scope, the target, and the input's canonical JSON."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from service.core.auth import key_hash, matches_any

ADMIN_SCOPE = "admin"  # the admin token is its own scope (sql/050_owners.sql uses the same owner)


def scope_of(key: str, admin_token: str | None) -> str:
    """The owner of a request: 'admin' for the admin token, else the SHA-256 of the API key."""
    return ADMIN_SCOPE if admin_token and matches_any(key, [admin_token]) else key_hash(key)


def canonical_json(value: Any) -> str:
    """Keys sorted, no insignificant whitespace, text as is: equal inputs give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def input_sha256(value: Any) -> str:
    # surrogatepass: JSON may carry an unpaired surrogate (\\ud800), which strict UTF-8 refuses.
    return hashlib.sha256(canonical_json(value).encode("utf-8", "surrogatepass")).hexdigest()
