"""Usage and cost, computed from what happened: the per-prediction projection of the log.

Each prediction counts once, at one instant: when its terminal state landed (`terminal_at`,
kept by the ingest transaction), or its first event while it is still open. Duplicates,
retries and reconcile events only ever touch that one projection row, so they cannot double
a count. Cost is `predict_time × RELAY_PRICES[model]`; a model without a price costs `None`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import asyncpg

from service.core.months import month_start, next_month
from service.core.params import utc_moment
from service.db.connection import Connection
from service.db.store import iso

GROUPS = ("model", "day")
TERMINAL_COUNTS = ("succeeded", "failed", "canceled", "aborted")
AT = "coalesce(terminal_at, first_received_at)"  # matches the predictions_usage_at index
KEYS = {"model": "model", "day": f"({AT} AT TIME ZONE 'UTC')::date"}

USAGE_SQL = """
SELECT GROUPING(key, model) AS level, key, model,
       count(*) AS started,
       {counts},
       count(*) FILTER (WHERE status_rank < 3) AS running,
       coalesce(sum(predict_time), 0) AS predict_time,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY predict_time) AS predict_time_p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY predict_time) AS predict_time_p95
FROM (SELECT {key} AS key, model, status, status_rank, predict_time
      FROM predictions WHERE {at} >= $1 AND {at} < $2) AS counted
GROUP BY GROUPING SETS ((key, model), (key), ())
ORDER BY key, model
"""


# The budget check needs only seconds per model: no percentiles, so no sort.
SPEND_SQL = f"""
SELECT model, sum(predict_time) AS seconds FROM predictions
WHERE {AT} >= $1 AND {AT} < $2 AND status_rank = 3 GROUP BY model
"""


# Answers given from the prediction cache (service/cache/): each saved its source's predict time.
CACHED_KEYS = {"model": "model", "day": "(answered_at AT TIME ZONE 'UTC')::date"}
CACHED_SQL = """
SELECT {key} AS key, model, count(*) AS answers, coalesce(sum(predict_time), 0) AS seconds
FROM cache_answers WHERE answered_at >= $1 AND answered_at < $2
GROUP BY 1, 2 ORDER BY 1, 2
"""


def usage_sql(group: str) -> str:
    counts = ",\n       ".join(f"count(*) FILTER (WHERE status = '{s}') AS {s}" for s in TERMINAL_COUNTS)
    return USAGE_SQL.format(counts=counts, key=KEYS[group], at=AT)


class UsageInputError(ValueError):
    """A bad `since`, `until` or `group`; the message names it."""


@dataclass(frozen=True)
class Period:
    since: datetime
    until: datetime
    group: str


def parse_moment(text: str, name: str) -> datetime:
    """An ISO 8601 date or date-time; without an offset it is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageInputError(
            f"{name} must be an ISO 8601 date or time such as 2026-11-01 or 2026-11-01T12:00:00Z, "
            f"got {text[:40]!r}"
        ) from None
    in_utc = utc_moment(moment)
    if in_utc is None:
        raise UsageInputError(f"{name} is outside the years 1-9999 once in UTC, got {text[:40]!r}")
    return in_utc


def period(since: str | None, until: str | None, group: str | None, now: datetime | None = None) -> Period:
    """The reporting window: by default this UTC calendar month up to now, grouped by model."""
    now = now or datetime.now(UTC)
    group = group or "model"
    if group not in GROUPS:
        raise UsageInputError(f"group must be one of {', '.join(GROUPS)}, got {group[:40]!r}")
    start = parse_moment(since, "since") if since else month_start(now)
    end = parse_moment(until, "until") if until else now
    if start >= end:
        raise UsageInputError(f"since ({iso(start)}) must be before until ({iso(end)})")
    return Period(start, end, group)


def _cost(seconds: dict[str | None, float], prices: dict[str, float]) -> float | None:
    if any(model not in prices for model in seconds):
        return None
    return round(sum(s * prices[model] for model, s in seconds.items() if model is not None), 6)


def _line(row: asyncpg.Record) -> dict[str, Any]:
    line = {name: row[name] for name in ("started", *TERMINAL_COUNTS, "running")}
    for name in ("predict_time", "predict_time_p50", "predict_time_p95"):
        line[name] = None if row[name] is None else round(row[name], 3)
    return line


def _key(value: Any) -> Any:
    return value.isoformat() if isinstance(value, date) else value


async def report(conn: Connection, when: Period, prices: dict[str, float]) -> dict[str, Any]:
    """`{since, until, group, groups: [...], total}`; each line has counts, seconds and cost."""
    rows = await conn.fetch(usage_sql(when.group), when.since, when.until)
    seconds: dict[Any, dict[str | None, float]] = {}
    for row in rows:
        if row["level"] == 0:
            seconds.setdefault(row["key"], {})[row["model"]] = row["predict_time"]
    everything = {m: s for by_model in seconds.values() for m, s in by_model.items()}
    groups, total = [], {}
    for row in rows:
        if row["level"] == 1:
            cost = _cost(seconds[row["key"]], prices)
            groups.append({when.group: _key(row["key"]), **_line(row), "cost": cost})
        elif row["level"] == 3:  # the grand total: always one row, even over no predictions
            total = {**_line(row), "cost": _cost(everything, prices)}
    return {
        "since": iso(when.since),
        "until": iso(when.until),
        "group": when.group,
        "currency": "USD",
        "groups": groups,
        "total": total,
        "cached": await cached_report(conn, when, prices),
    }


def _saved(answers: int, seconds: dict[str | None, float], prices: dict[str, float]) -> dict[str, Any]:
    return {
        "answers": answers,
        "predict_time_saved": round(sum(seconds.values()), 3),
        "cost_saved": _cost(seconds, prices),
    }


async def cached_report(conn: Connection, when: Period, prices: dict[str, float]) -> dict[str, Any]:
    """Answers from the prediction cache in the period, and the predict time and cost they saved."""
    rows = await conn.fetch(CACHED_SQL.format(key=CACHED_KEYS[when.group]), when.since, when.until)
    by_key: dict[Any, tuple[int, dict[str | None, float]]] = {}
    for row in rows:
        count, seconds = by_key.get(row["key"], (0, {}))
        seconds[row["model"]] = row["seconds"]
        by_key[row["key"]] = (count + row["answers"], seconds)
    everything = {m: s for _, seconds in by_key.values() for m, s in seconds.items()}
    groups = [{when.group: _key(k), **_saved(n, seconds, prices)} for k, (n, seconds) in by_key.items()]
    return {**_saved(sum(n for n, _ in by_key.values()), everything, prices), "groups": groups}


async def month_spend(conn: Connection, prices: dict[str, float], now: datetime) -> float:
    """Estimated spend of `now`'s UTC calendar month; unpriced models add nothing."""
    rows = await conn.fetch(SPEND_SQL, month_start(now), next_month(now))
    spend: float = sum(r["seconds"] * prices.get(r["model"], 0.0) for r in rows if r["seconds"])
    return round(spend, 6)


async def budget_status(conn: Connection, prices: dict[str, float], budget: float | None) -> dict[str, Any]:
    """This UTC month's spend against `RELAY_BUDGET` (what a dashboard shows)."""
    now = datetime.now(UTC)
    spend = await month_spend(conn, prices, now)
    used = round(spend / budget, 4) if budget else None
    return {"month": now.strftime("%Y-%m"), "spend": spend, "budget": budget, "used": used}


COLUMNS = ("started", *TERMINAL_COUNTS, "running", "predict_time", "predict_time_p50", "predict_time_p95")
HEADINGS = ("started", *TERMINAL_COUNTS, "running", "seconds", "p50 s", "p95 s", "cost USD")


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def format_table(usage: dict[str, Any]) -> str:
    """The report as an aligned text table, one line per group and a total; no price shows "-"."""
    lines: list[tuple[str, ...]] = [(usage["group"], *HEADINGS)]
    for line in [*usage["groups"], {usage["group"]: "total", **usage["total"]}]:
        lines.append((_cell(line[usage["group"]]), *(_cell(line[c]) for c in (*COLUMNS, "cost"))))
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    title = f"usage {usage['since']} .. {usage['until']}"
    return "\n".join([title, *(_aligned(row, widths) for row in lines), *_cached_line(usage)])


def _cached_line(usage: dict[str, Any]) -> list[str]:
    """One line under the table when the prediction cache answered in the period."""
    cached = usage.get("cached")
    if not cached or not cached["answers"]:
        return []
    seconds, cost = _cell(float(cached["predict_time_saved"])), _cell(cached["cost_saved"])
    return [f"cached answers: {cached['answers']}, saving {seconds} s of predict time and {cost} USD"]


def _aligned(row: tuple[str, ...], widths: list[int]) -> str:
    cells = [row[0].ljust(widths[0])]
    cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
    return "  ".join(cells)
