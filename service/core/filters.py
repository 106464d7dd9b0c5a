"""The one event filter operators use everywhere: admin API query, export, replay, `relay events`.

Parsed from the same names whether they come from HTTP query parameters or CLI flags; a bad
value raises `InvalidRequest` (400), which the CLI turns into a one-line error and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.core.errors import ConfigError, InvalidRequest, RelayError
from service.core.params import parse_int, utc_moment

SOURCES = ("webhook", "reconcile", "erasure")
FILTER_NAMES = ("prediction_id", "status", "source", "since", "until", "after", "before")
# CLI flag for each filter name: `--prediction` is the one that differs.
CLI_FLAGS = {name: "--" + name.removesuffix("_id") for name in FILTER_NAMES}
MAX_TEXT = 256


@dataclass(frozen=True)
class EventFilter:
    """`since` is inclusive and `until` exclusive on `received_at`; `after`/`before` exclude."""

    prediction_id: str | None = None
    status: str | None = None
    source: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after: int = 0
    before: int | None = None

    def where(self, args: list[Any] | None = None) -> tuple[str, list[Any]]:
        """A parameterised WHERE clause (no values in the SQL text) and its arguments."""
        args = [] if args is None else args
        clauses = []
        for sql, value in (
            ("seq > {}", self.after),
            ("seq < {}", self.before),
            ("prediction_id = {}", self.prediction_id),
            ("status = {}", self.status),
            ("source = {}", self.source),
            ("received_at >= {}", self.since),
            ("received_at < {}", self.until),
        ):
            if value is not None:
                args.append(value)
                clauses.append(sql.format(f"${len(args)}"))
        # With a cursor (the next page) the walk already starts at `after`, in the window.
        if self.since is not None and self.prediction_id is None and self.after == 0:
            clauses.append(self._window_start(args))
        return " AND ".join(clauses), args

    def _window_start(self, args: list[Any]) -> str:
        """`seq >=` the smallest seq received in the time window: true of every matching row, so
        it changes no result, but it lets `ORDER BY seq LIMIT n` start at the window. Without it
        the planner, which does not know that seq and received_at rise together, walks the
        primary key from the first row (100 ms per million rows before the window)."""
        args.append(self.since)
        window = f"received_at >= ${len(args)}"
        if self.until is not None:
            args.append(self.until)
            window += f" AND received_at < ${len(args)}"
        # OFFSET 0 keeps the subquery apart, so it is an index range scan on (received_at, seq).
        return f"seq >= (SELECT min(seq) FROM (SELECT seq FROM events WHERE {window} OFFSET 0) AS w)"

    def starting_after(self, seq: int) -> EventFilter:
        return dataclasses.replace(self, after=max(self.after, seq))

    def as_params(self) -> dict[str, str]:
        """The filter as query parameters, the inverse of `parse_filter`."""
        params = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None or (field.name == "after" and value == 0):
                continue
            params[field.name] = value.isoformat() if isinstance(value, datetime) else str(value)
        return params


def _text(name: str, raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw or len(raw) > MAX_TEXT or "\x00" in raw:
        raise InvalidRequest(f"{name} must be a non-empty string of at most {MAX_TEXT} characters")
    return raw


def _moment(name: str, raw: object) -> datetime | None:
    if raw is None or raw == "":
        return None
    try:
        moment = datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        moment = None
    if moment is None:
        raise InvalidRequest(
            f"{name} must be an ISO 8601 time such as 2026-11-20T10:30:00Z, got {str(raw)[:40]!r}"
        )
    in_utc = utc_moment(moment)
    if in_utc is None:
        raise InvalidRequest(f"{name} is outside the years 1-9999 once in UTC, got {str(raw)[:40]!r}")
    return in_utc


def _seq(name: str, raw: Any) -> int | None:
    if raw is None:
        return None
    return parse_int(name, str(raw), 0)


def parse_filter(values: Mapping[str, Any], *, extra: tuple[str, ...] = ()) -> EventFilter:
    """An EventFilter from `{name: text}`; unknown names (other than `extra`) are refused."""
    unknown = sorted(set(values) - set(FILTER_NAMES) - set(extra))
    if unknown:
        raise InvalidRequest(f"unknown filter {unknown[0]!r}; filters are: {', '.join(FILTER_NAMES)}")
    source = _text("source", values.get("source"))
    if source is not None and source not in SOURCES:
        raise InvalidRequest(f"source must be one of {', '.join(SOURCES)}, got {source[:40]!r}")
    found = EventFilter(
        prediction_id=_text("prediction_id", values.get("prediction_id")),
        status=_text("status", values.get("status")),
        source=source,
        since=_moment("since", values.get("since")),
        until=_moment("until", values.get("until")),
        after=_seq("after", values.get("after")) or 0,
        before=_seq("before", values.get("before")),
    )
    if found.since and found.until and found.since >= found.until:
        raise InvalidRequest("since must be earlier than until")
    return found


def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--prediction --status --source --since --until --after --before` flags."""
    for name, flag in CLI_FLAGS.items():
        parser.add_argument(flag, dest=name, metavar=name.split("_")[0].upper())


def filter_from_args(args: argparse.Namespace) -> EventFilter:
    """The filter given on the command line; a bad value is a ConfigError naming the flag."""
    values = {name: getattr(args, name) for name in FILTER_NAMES if getattr(args, name) is not None}
    try:
        return parse_filter(values)
    except RelayError as error:
        message = error.message
        for name, flag in CLI_FLAGS.items():
            message = message.replace(f"{name} must", f"{flag} must", 1)
        raise ConfigError(message) from None
