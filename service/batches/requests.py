"""Checking `POST /api/batches` before anything is stored or sent upstream.

Each input is checked exactly as a single `POST /api/predictions` would be
(`core.validation.create_request`); the first bad one refuses the whole batch with a 400 that
names its index and field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.core.errors import InvalidRequest
from service.core.validation import WEBHOOK_EVENTS, create_request, is_json_integer, unstorable

MAX_INPUTS = 10_000
MAX_CONCURRENCY = 50
DEFAULT_CONCURRENCY = 5
BATCH_FIELDS = {"version", "model", "inputs", "concurrency", "webhook_events_filter"}


@dataclass(frozen=True)
class BatchRequest:
    """A checked batch: where to create, how, how many at once, and each item's input."""

    path: str
    target: dict[str, str]  # {"model": …} or {"version": …}
    events_filter: list[str]
    concurrency: int
    inputs: list[dict[str, Any]]


def _concurrency(value: Any) -> int:
    if value is None:
        return DEFAULT_CONCURRENCY
    # JSON has one number type: 5.0 is the integer 5 (JSON Schema's "integer" agrees).
    if not is_json_integer(value) or not 1 <= value <= MAX_CONCURRENCY:
        raise InvalidRequest(f"concurrency must be an integer from 1 to {MAX_CONCURRENCY}")
    return int(value)


def _inputs(value: Any) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("inputs must be a non-empty list of input objects")
    if len(value) > MAX_INPUTS:
        raise InvalidRequest(f"inputs holds {len(value)} items; a batch takes at most {MAX_INPUTS}")
    return value


def non_finite(values: Any) -> str | None:
    """Where the first NaN or Infinity inside an input is (`input.a[2]`), else None. Python's json
    reads them (and 1e999 as Infinity), but JSON cannot carry them: not to Replicate, not in jsonb."""
    pending: list[tuple[str, Any]] = [("input", values)]
    while pending:  # iterative: nesting depth cannot overflow it
        path, item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path
        if isinstance(item, dict):
            pending.extend(reversed([(f"{path}.{key}", value) for key, value in item.items()]))
        elif isinstance(item, list):
            pending.extend(reversed([(f"{path}[{n}]", value) for n, value in enumerate(item)]))
    return None


def batch_request(body: Any, webhook_url: str, learned: Mapping[str, str] | None = None) -> BatchRequest:
    """The checked batch; a 400 naming the first problem (`inputs[3]: input.prompt …`). `learned`
    maps bare version ids to models, as for a single create."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object with version or model, and inputs")
    unknown = sorted(set(body) - BATCH_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {unknown}; allowed: {sorted(BATCH_FIELDS)}")
    concurrency = _concurrency(body.get("concurrency"))
    inputs = _inputs(body.get("inputs"))
    target = {name: body[name] for name in ("model", "version") if body.get(name) is not None}
    common = {**target, "webhook_events_filter": body.get("webhook_events_filter")}
    path, events_filter = "", []
    for index, values in enumerate(inputs):
        try:
            found, payload = create_request({**common, "input": values}, webhook_url, learned)
        except InvalidRequest as error:
            if index == 0 and not error.message.startswith("input"):
                raise  # a problem with the batch itself (model, version, filter), not an input
            raise InvalidRequest(f"inputs[{index}]: {error.message}") from None
        if (problem := unstorable(values)) is not None:
            raise InvalidRequest(f"inputs[{index}]: input {problem}")  # the items are kept in jsonb
        if (where := non_finite(values)) is not None:
            raise InvalidRequest(f"inputs[{index}]: {where} is NaN or Infinity, which JSON cannot carry")
        path, events_filter = found.path, payload["webhook_events_filter"]
    # An item's end is what starts the next one: without `completed`, Replicate would not say so,
    # and every item would wait for reconcile (RELAY_RECONCILE_AFTER, minutes) to free its slot.
    wanted = {*events_filter, "completed"}
    events_filter = [event for event in WEBHOOK_EVENTS if event in wanted]
    return BatchRequest(path, target, events_filter, concurrency, inputs)
