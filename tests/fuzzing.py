"""Fuzzing a running Relay from its own /openapi.json with schemathesis (tests and bench/fuzz.py)."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

# `since` must be earlier than `until`: a rule between two parameters that OpenAPI cannot state, so
# a generated valid-looking pair may be refused (400) there. Every other check still applies.
CROSS_FIELD_RULES = {("get", "/admin/events"), ("get", "/admin/usage"), ("post", "/admin/replay")}


def fuzz(
    schema: schemathesis.BaseSchema,
    method: str,
    path: str,
    examples: int,
    token: str,
    mode: schemathesis.GenerationMode = schemathesis.GenerationMode.POSITIVE,
) -> None:
    """Generated requests for one operation, each sent with a valid token and every check run."""
    operation = schema[path][method]
    headers = {"Authorization": f"Bearer {token}"}
    excluded = [positive_data_acceptance] if (method, path) in CROSS_FIELD_RULES else []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers, excluded_checks=excluded)

    run()
