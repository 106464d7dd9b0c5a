"""Query and flag values as bounded integers, with errors that name the parameter."""

from __future__ import annotations

from service.core.errors import InvalidRequest

MAX_PAGE = 1000  # rows in one page of events, over HTTP and in `relay events`


def parse_int(name: str, raw: str | None, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    """A bounded non-negative integer from text; InvalidRequest naming `name` otherwise."""
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit():
        raise InvalidRequest(f"{name} must be a non-negative integer, got {raw[:40]!r}")
    value = int(raw)
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise InvalidRequest(f"{name} must be {bounds}, got {value}")
    return value
