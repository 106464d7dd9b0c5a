"""Request parameters the database can take: bounded integers and representable times.

A value Postgres or the driver cannot carry (a seq past 2^63-1, thousands of digits, a time
whose UTC form leaves years 1-9999, NUL in text) is refused here as a 400 naming the parameter,
never left to fail as a 500 deep in a query.
"""

from __future__ import annotations

from datetime import UTC, datetime

from service.core.errors import InvalidRequest

MAX_BIGINT = 2**63 - 1  # Postgres bigint: every seq, every limit
MAX_DIGITS = len(str(MAX_BIGINT))
MAX_PAGE = 1000  # rows in one page of events, over HTTP and in `relay events`


def parse_int(name: str, raw: str | None, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    """A bounded non-negative integer from text (at most 2^63-1); InvalidRequest naming `name`."""
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit():
        raise InvalidRequest(f"{name} must be a non-negative integer, got {raw[:40]!r}")
    # Checked before int(): Python refuses to convert more than 4,300 digits (ValueError).
    value = int(raw) if len(raw.lstrip("0")) <= MAX_DIGITS else MAX_BIGINT + 1
    upper = MAX_BIGINT if maximum is None else min(maximum, MAX_BIGINT)
    if value < minimum or value > upper:
        raise InvalidRequest(f"{name} must be between {minimum} and {upper}, got {raw[:40]}")
    return value


def utc_moment(moment: datetime) -> datetime | None:
    """`moment` in UTC (naive means UTC), or None when UTC would leave years 1-9999
    (0001-01-01T00:00:00+05:00 parses, but is in year 0 in UTC, which nothing can store)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return None


def check_text(name: str, raw: str, maximum: int) -> str:
    """Non-empty text of at most `maximum` characters, without NUL (Postgres text cannot hold it)."""
    if not raw or len(raw) > maximum or "\x00" in raw:
        raise InvalidRequest(f"{name} must be 1 to {maximum} characters, without NUL")
    return raw
