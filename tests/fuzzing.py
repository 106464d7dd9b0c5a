"""Fuzzing a running Relay from its own /openapi.json with schemathesis (tests and bench/fuzz.py)."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

# `since` must be earlier than `until`: a rule between two parameters that OpenAPI cannot state, so
# a generated valid-looking pair may be refused (400) there. Every other check still applies.
CROSS_FIELD_RULES = {
    ("get", "/admin/events"),
    ("get", "/admin/usage"),
    ("post", "/admin/replay"),
    ("post", "/admin/destinations"),
}


REQUEST_TIMEOUT = 75


def can_break(document: dict, method: str, path: str) -> bool:
    """Whether an operation takes anything a request could get wrong (parameters or a body)."""
    spec = document["paths"][path][method]
    free = {"type": "string"}  # a path segment that any text satisfies cannot be made invalid
    constrained = [p for p in spec.get("parameters", []) if p["in"] != "path" or p["schema"] != free]
    return bool(constrained or spec.get("requestBody"))


def fuzz(
    schema: schemathesis.BaseSchema,
    method: str,
    path: str,
    examples: int,
    token: str,
    mode: schemathesis.GenerationMode = schemathesis.GenerationMode.POSITIVE,
    derandomize: bool = False,
) -> None:
    """Generated requests for one operation, each sent with a valid token and every check run.

    `derandomize` makes the cases the same on every run (the suite: a failure always reproduces);
    bench/fuzz.py explores new ones each time."""
    operation = schema[path][method]
    headers = {"Authorization": f"Bearer {token}"}
    if mode == schemathesis.GenerationMode.NEGATIVE:
        # Invalid input must be refused in the error shape, never a 5xx. Relay is lenient where
        # that is harmless (an empty `limit=` means the default; unknown query names are ignored),
        # so "accepted invalid data" is not a failure here.
        excluded = [negative_data_rejection, positive_data_acceptance]
    else:
        excluded = [positive_data_acceptance] if (method, path) in CROSS_FIELD_RULES else []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=derandomize,
    )
    def run(case: schemathesis.Case) -> None:
        # A replay may wait up to 60 s by design (?wait=): a shorter client timeout would fail a
        # correct answer that is merely slow.
        case.call_and_validate(headers=headers, excluded_checks=excluded, timeout=REQUEST_TIMEOUT)

    run()
