"""Calendar months in UTC: the unit of the log's partitions and of usage and budget periods."""

from __future__ import annotations

from datetime import UTC, datetime


def month_start(moment: datetime) -> datetime:
    """Midnight UTC on the first day of `moment`'s month."""
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def next_month(moment: datetime) -> datetime:
    """Midnight UTC on the first day of the month after `moment`'s."""
    year, month = divmod(moment.year * 12 + moment.month, 12)  # month is 0-based here
    return datetime(year, month + 1, 1, tzinfo=UTC)
