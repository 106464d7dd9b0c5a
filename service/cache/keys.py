"""What a cached answer is keyed by: the caller (its owner name, db/owners.py), the target, and
the input's canonical JSON."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """Keys sorted, no insignificant whitespace, text as is: equal inputs give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def input_sha256(value: Any) -> str:
    # surrogatepass: JSON may carry an unpaired surrogate (\\ud800), which strict UTF-8 refuses.
    return hashlib.sha256(canonical_json(value).encode("utf-8", "surrogatepass")).hexdigest()
