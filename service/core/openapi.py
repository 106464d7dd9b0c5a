"""Building blocks for Relay's OpenAPI 3.1 description, declared next to the routes.

Each module that defines HTTP routes also defines `openapi`: a mapping of path -> method ->
operation, built with `operation()` below. `web/app.py` gathers the modules' routes and their
`openapi` together (ROUTE_MODULES), `GET /openapi.json` serves the merged document, and a test
fails when an HTTP route has no operation (or an operation no route). Pure: no web framework.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Schema = dict[str, Any]
Paths = Mapping[str, Mapping[str, Mapping[str, Any]]]

# The three ways a caller authenticates (all also accepted as `?token=` where noted).
ADMIN, API_KEY, SUBSCRIBER = "AdminToken", "ApiKey", "SubscriberToken"
SECURITY_SCHEMES: dict[str, Schema] = {
    ADMIN: {
        "type": "http",
        "scheme": "bearer",
        "description": "RELAY_ADMIN_TOKEN. Reads and operates on everything; also accepted by every "
        "route that takes an API key or a subscriber token.",
    },
    API_KEY: {
        "type": "http",
        "scheme": "bearer",
        "description": "A key from RELAY_API_KEYS (or the admin token), for /api/*: each key has its "
        "own rate limit and cache scope.",
    },
    SUBSCRIBER: {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "An HS256 JWT signed with RELAY_SUBSCRIBE_KEY, claims `prediction` (an id or `*`) "
        "and `exp`; as `Authorization: Bearer` or `?token=`. Returned by POST /api/predictions.",
    },
}

ERROR_CODE = {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$"}


def ref_name(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": ERROR_CODE, "message": {"type": "string"}},
            }
        },
    },
    "Event": {
        "type": "object",
        "required": ["type", "seq", "prediction_id", "status", "webhook_id", "source", "received_at"],
        "properties": {
            "type": {"const": "event"},
            "seq": {"type": "integer"},
            "prediction_id": {"type": "string"},
            "status": {"type": "string"},
            "webhook_id": {"type": "string"},
            "source": {"enum": ["webhook", "reconcile", "erasure"]},
            "received_at": {"type": "string", "format": "date-time"},
            "replayed": {"type": "boolean"},
            "prediction": {"description": "the delivered prediction object, exactly as received"},
        },
    },
    "EventsPage": {
        "type": "object",
        "required": ["events", "next_after"],
        "properties": {
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
            "next_after": {"type": "integer", "description": "pass as `after` for the next page"},
        },
    },
    "PredictionState": {
        "type": "object",
        "required": ["id", "status", "last_seq", "event_count"],
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string"},
            "last_seq": {"type": "integer"},
            "event_count": {"type": "integer"},
            "output": {},
            "error": {},
            "logs": {"type": ["string", "null"]},
            "metrics": {"type": ["object", "null"]},
            "created_at": {"type": ["string", "null"]},
            "started_at": {"type": ["string", "null"]},
            "completed_at": {"type": ["string", "null"]},
            "erased": {"const": True},
        },
    },
}

# What Postgres jsonb holds: any JSON, except a NUL in a key or a string (batch inputs are kept so).
NO_NUL = "^[^\\x00]*$"
SCHEMAS["StorableValue"] = {
    "anyOf": [
        {"type": "string", "pattern": NO_NUL},
        {"type": ["number", "boolean", "null"]},
        {"type": "array", "items": ref_name("StorableValue")},
        ref_name("StorableObject"),
    ]
}
SCHEMAS["StorableObject"] = {
    "type": "object",
    "propertyNames": {"pattern": NO_NUL},
    "additionalProperties": ref_name("StorableValue"),
}

STATUS_TEXT = {
    200: "OK",
    201: "Created",
    400: "Invalid request (INVALID_REQUEST, INVALID_PAYLOAD, …)",
    401: "No credentials (UNAUTHORIZED), or a webhook signature that does not verify",
    403: "Credentials that do not allow this (FORBIDDEN)",
    404: "Unknown resource (NOT_FOUND)",
    405: "Method not allowed (METHOD_NOT_ALLOWED)",
    409: "Conflict with the current state",
    413: "Body too large (BODY_TOO_LARGE)",
    416: "The range is outside the file (RANGE_NOT_SATISFIABLE)",
    429: "Rate limited (RATE_LIMIT_ERROR), or too many replays running (TOO_MANY_REPLAYS); see Retry-After",
    502: "Replicate failed (PROCESSING_ERROR, NETWORK_ERROR, UNKNOWN_ERROR)",
    503: "Unavailable (DATABASE_UNAVAILABLE, PROXY_DISABLED, STORE_UNAVAILABLE); see Retry-After",
    504: "Replicate did not answer in time (TIMEOUT)",
}
# What any route can answer besides its own: a database outage, and a request head too large.
COMMON_ERRORS = (503,)


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(schema: Schema, description: str = "") -> dict[str, Any]:
    return {"description": description or "OK", "content": {"application/json": {"schema": schema}}}


def errors(*statuses: int) -> dict[str | int, Any]:
    """The error shape `{"error": {"code", "message"}}` for each status."""
    return {s: json_body(ref("Error"), STATUS_TEXT[s]) for s in (*statuses, *COMMON_ERRORS)}


def _param(where: str, name: str, schema: Schema, description: str, required: bool) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "description": description, "schema": schema}


def path_param(name: str, description: str = "", schema: Schema | None = None) -> dict[str, Any]:
    return _param("path", name, schema or {"type": "string"}, description, True)


def query_param(name: str, schema: Schema, description: str = "", required: bool = False) -> dict[str, Any]:
    return _param("query", name, schema, description, required)


def header_param(name: str, description: str, schema: Schema | None = None) -> dict[str, Any]:
    return _param("header", name, schema or {"type": "string"}, description, True)


TOKEN_QUERY = query_param("token", {"type": "string"}, "the token, when a header cannot be sent (browsers)")
SEQ = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}


def operation(
    summary: str,
    *,
    tag: str,
    responses: Mapping[str | int, Any],
    security: Sequence[str] = (),
    parameters: Iterable[Mapping[str, Any]] = (),
    body: Schema | None = None,
    description: str = "",
) -> dict[str, Any]:
    """One operation. `security` names schemes any one of which is accepted; empty means open."""
    spec: dict[str, Any] = {
        "summary": summary,
        "tags": [tag],
        "responses": {str(status): answer for status, answer in responses.items()},
    }
    if description:
        spec["description"] = description
    spec["security"] = [{name: []} for name in security] if security else []
    params = list(parameters)
    if params:
        spec["parameters"] = params
    if body is not None:
        spec["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return spec


def document(parts: Iterable[Paths], version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of all the route modules' operations."""
    paths: dict[str, dict[str, Any]] = {}
    for part in parts:
        for path, methods in part.items():
            for method, spec in methods.items():
                if method in paths.setdefault(path, {}):
                    raise ValueError(f"{method.upper()} {path} is declared twice")
                paths[path][method] = dict(spec)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Relay",
            "version": version,
            "description": "Verified Replicate webhooks into an append-only Postgres log, fanned out "
            "live over WebSockets (WS /predictions/{id}/ws and /events/ws, not described here).",
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": SCHEMAS, "securitySchemes": SECURITY_SCHEMES},
    }
