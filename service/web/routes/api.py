"""`/api/predictions`: create, get, cancel and list Replicate predictions through Relay.

Every call needs the admin token or a key from RELAY_API_KEYS and counts against that key's
hourly quota. A create always points Replicate's webhook at Relay, and each prediction comes
back with `relay: {ws, token}` so the caller can watch it live.

Each prediction belongs to the key that created it (`prediction_owners`): another key gets 404
for it (no data, no token, no cancel, no upstream call) and never sees it in a list; the admin
token sees every prediction.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.cache import store as cache
from service.cache.keys import input_sha256
from service.core.auth import matches_any, mint_token
from service.core.errors import InvalidRequest, NotFound, RelayError
from service.core.logcontext import bind
from service.core.openapi import ADMIN, API_KEY, errors, json_body, operation, path_param, query_param
from service.core.validation import (
    MODEL_PATTERN,
    MODELS,
    PREDICTION_ID_PATTERN,
    VERSION_PATTERN,
    WEBHOOK_EVENTS,
    check_prediction_id,
    create_request,
    pinned_version,
)
from service.core.validation import PREDICTION_ID as AN_ID
from service.db import owners
from service.upstream import ratelimit, versions
from service.upstream.client import UnknownError, Upstream, list_page
from service.upstream.ratelimit import Quota
from service.web import auth
from service.web.auth import route, token_of
from service.web.routes.reading import archive_list
from service.web.routes.webhooks import read_body
from service.web.state import relay_of

CURSOR = re.compile(r"[A-Za-z0-9=+/_.:%-]{1,512}")


class ProxyDisabled(RelayError):
    status = 503
    code = "PROXY_DISABLED"


def caller_owner(key: str, admin_token: str | None) -> str:
    """The owner name of a caller: `admin` for the admin token, else the key's hash."""
    return owners.ADMIN if matches_any(key, [admin_token]) else ratelimit.key_hash(key)


async def admit(request: Request) -> tuple[Upstream, Quota, str]:
    """Authenticate, count the request against the key's quota, and require the upstream.
    Returns the upstream, the quota and the caller's owner name."""
    relay = relay_of(request)
    settings = relay.settings
    key = token_of(request)  # admitted by the route's API_KEY access
    quota = await ratelimit.take(relay.pool, key, settings.api_rate_limit)
    if relay.upstream is None:
        raise ProxyDisabled(
            "the predictions API is off: set REPLICATE_API_TOKEN (or REPLICATE_API_KEY) "
            "to a Replicate API token and restart Relay",
            headers=quota.headers(),
        )
    return relay.upstream, quota, caller_owner(key, settings.admin_token)


async def require_owned(request: Request, caller: str, quota: Quota) -> str:
    """The path's prediction id, when the caller may see it; the same 404 as an unknown one
    otherwise, so another key cannot even learn that the prediction exists."""
    prediction_id = check_prediction_id(request.path_params["prediction_id"])
    if caller != owners.ADMIN:
        owner = await owners.owner_of(relay_of(request).pool, prediction_id)
        if not owners.may_see(caller, owner):
            raise NotFound(f"no prediction {prediction_id[:40]!r} for this API key", headers=quota.headers())
    return prediction_id


def with_relay(request: Request, prediction: dict[str, Any]) -> dict[str, Any]:
    """Replicate's prediction plus where and with what token to watch it on Relay."""
    settings = relay_of(request).settings
    prediction_id = prediction.get("id")
    if not isinstance(prediction_id, str):
        return prediction
    return {
        **prediction,
        "relay": {
            "ws": f"{settings.ws_base_url}/predictions/{prediction_id}/ws",
            "token": mint_token(settings.subscribe_key, prediction_id),
        },
    }


async def read_json(request: Request) -> Any:
    body = await read_body(request, relay_of(request).settings.api_max_body, "RELAY_API_MAX_BODY")
    try:
        return json.loads(body, parse_constant=not_json, parse_float=finite_float)
    except (ValueError, RecursionError):
        raise InvalidRequest(
            "the body is not valid JSON (RFC 8259: no NaN or Infinity, no number past 1.8e308)"
        ) from None


def not_json(constant: str) -> Any:
    """Python's json reads NaN and Infinity, which JSON has not: Replicate could not take them."""
    raise ValueError(f"{constant} is not JSON")


def finite_float(text: str) -> float:
    """A JSON number as a float; `1e999` overflows to infinity, which no JSON encoder (httpx's
    for Replicate, the cache's canonical form) can write back, so it is refused like NaN."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range")
    return value


async def create_prediction(request: Request) -> JSONResponse:
    upstream, quota, caller = await admit(request)
    relay = relay_of(request)
    body = await read_json(request)
    learned = await versions.lookup(relay.pool, pinned_version(body))
    target, payload = create_request(body, relay.settings.webhook_url, learned)
    # The cache is scoped like ownership: a key sees only answers it created, the admin its own.
    key = (
        cache.CacheKey(caller, target.cache_key, input_sha256(payload["input"]))
        if body.get("cache") is True
        else None
    )
    if key is not None and (hit := await cache.find(relay.pool, relay.vault, key, relay.settings.cache_ttl)):
        bind(prediction_id=hit.prediction_id)
        return JSONResponse(await cached_answer(request, hit), headers=quota.headers())
    reply = await upstream.create(target.path, payload)
    prediction_id = reply.data.get("id")
    # Relay records the owner of this id and mints a token for it: it must be a prediction id.
    if not isinstance(prediction_id, str) or not AN_ID.fullmatch(prediction_id):
        raise UnknownError("Replicate answered the create without a valid prediction id")
    bind(prediction_id=prediction_id)  # the access line names the prediction made
    await owners.record_owner(relay.pool, prediction_id, caller)
    await versions.learn(relay.pool, reply.data)
    if key is not None:
        await cache.remember(relay.pool, key, prediction_id)
    return JSONResponse(with_relay(request, reply.data), status_code=201, headers=quota.headers())


async def cached_answer(request: Request, hit: cache.Hit) -> dict[str, Any]:
    """The source prediction as a create answer: `relay.cached` and `relay.source` say so, and
    outputs Relay has archived point at its copies (Replicate deletes its own after an hour)."""
    relay = relay_of(request)
    async with relay.pool.acquire() as conn:
        archive = await archive_list(conn, request, hit.prediction)
    copies = {e["url"]: relay.settings.base_url + e["file"] for e in archive if e.get("status") == "stored"}
    answer = with_relay(request, cache.pointing_at_copies(hit.prediction, copies))
    answer["relay"] = {"cached": True, "source": hit.prediction_id, **answer.get("relay", {})}
    return {**answer, "archive": archive}


async def get_prediction(request: Request) -> JSONResponse:
    upstream, quota, caller = await admit(request)
    reply = await upstream.get(await require_owned(request, caller, quota))
    await versions.learn(relay_of(request).pool, reply.data)
    async with relay_of(request).pool.acquire() as conn:
        archive = await archive_list(conn, request, reply.data)
    return JSONResponse({**with_relay(request, reply.data), "archive": archive}, headers=quota.headers())


async def cancel_prediction(request: Request) -> JSONResponse:
    upstream, quota, caller = await admit(request)
    reply = await upstream.cancel(await require_owned(request, caller, quota))
    return JSONResponse(with_relay(request, reply.data), headers=quota.headers())


async def list_predictions(request: Request) -> JSONResponse:
    upstream, quota, caller = await admit(request)
    reply = await upstream.list(list_cursor(request.query_params.get("cursor")))
    page = list_page(reply.data, relay_of(request).settings.base_url)
    if caller != owners.ADMIN:
        page["results"] = await only_owned(request, caller, page.get("results"))
    return JSONResponse(page, headers=quota.headers())


def list_cursor(raw: str | None) -> str | None:
    """Replicate's opaque page cursor (URL-safe base64-like text), refused (400) when it could
    not be one, before it reaches Replicate."""
    if not raw:
        return None
    if not CURSOR.fullmatch(raw):
        raise InvalidRequest("cursor must be the cursor of a page link (letters, digits, =+/_.-)")
    return raw


async def only_owned(request: Request, caller: str, results: Any) -> list[Any]:
    """The entries of an upstream page that the caller created (pages may come back shorter
    than Replicate's: the cursors still walk the whole upstream list)."""
    entries = results if isinstance(results, list) else []
    ids = [entry["id"] for entry in entries if isinstance(entry, dict) and isinstance(entry.get("id"), str)]
    mine = await owners.owned_among(relay_of(request).pool, caller, ids)
    return [entry for entry in entries if isinstance(entry, dict) and entry.get("id") in mine]


RELAY_BLOCK = {
    "type": "object",
    "required": ["ws", "token"],
    "properties": {
        "ws": {"type": "string", "description": "WebSocket URL streaming this prediction's events"},
        "token": {"type": "string", "description": "subscriber token for the ws URL and the reading routes"},
        "cached": {"const": True, "description": "present when answered from the prediction cache"},
        "source": {"type": "string", "description": "the cached prediction's id"},
    },
}
PREDICTION = {
    "type": "object",
    "description": "Replicate's prediction object, plus `relay`",
    "properties": {"id": {"type": "string"}, "status": {"type": "string"}, "relay": RELAY_BLOCK},
}


def model_rules(field: str = "input", many: bool = False) -> list[dict[str, Any]]:
    """For each model Relay validates, its input rules whenever `model` or `version` names it
    (for `field`, one input object, or with `many` a list of them)."""
    rules = []
    for schema in MODELS.values():
        named = re.escape(schema.name)
        by_model = {"required": ["model"], "properties": {"model": {"const": schema.name}}}
        by_version = {"required": ["version"], "properties": {"version": {"pattern": f"^{named}(?::.*)?$"}}}
        rules_of = schema.input_schema()
        then = {"properties": {field: {"type": "array", "items": rules_of} if many else rules_of}}
        rules.append({"if": {"anyOf": [by_model, by_version]}, "then": then})
    return rules


CREATE_BODY = {
    "type": "object",
    "description": "Exactly one of `version` or `model`. A `webhook` other than Relay's own is refused. "
    "Input for a model Relay knows is validated whichever form names it, a bare version id "
    "once Relay has seen Replicate answer with it.",
    "required": ["input"],
    "oneOf": [{"required": ["version"]}, {"required": ["model"]}],
    "additionalProperties": False,
    "properties": {
        "version": {
            "type": "string",
            "pattern": VERSION_PATTERN,
            "description": "owner/name, owner/name:version_id, or a bare version_id",
        },
        "model": {"type": "string", "pattern": MODEL_PATTERN, "description": "owner/name"},
        "input": {"type": "object"},
        "webhook_events_filter": {
            "type": "array",
            "minItems": 1,
            "items": {"enum": list(WEBHOOK_EVENTS)},
        },
        "cache": {
            "type": "boolean",
            "description": "answer from an identical succeeded prediction of this key within RELAY_CACHE_TTL",
        },
    },
    "allOf": model_rules(),
}
PAGE = {
    "type": "object",
    "required": ["results"],
    "properties": {
        "results": {"type": "array", "items": PREDICTION},
        "next": {"type": ["string", "null"]},
        "previous": {"type": ["string", "null"]},
    },
}
KEYS = (API_KEY, ADMIN)
UPSTREAM_ERRORS = (400, 401, 403, 413, 429, 502, 504)
PREDICTION_ID = path_param(
    "prediction_id", "the Replicate prediction id", {"type": "string", "pattern": PREDICTION_ID_PATTERN}
)
openapi = {
    "/api/predictions": {
        "post": operation(
            "Create a prediction on Replicate, its webhook pointed at Relay",
            tag="api",
            security=KEYS,
            body=CREATE_BODY,
            responses={
                201: json_body(PREDICTION, "Created upstream"),
                200: json_body(PREDICTION, "Answered from the prediction cache (relay.cached)"),
                **errors(*UPSTREAM_ERRORS),
            },
        ),
        "get": operation(
            "List predictions (Replicate's pages, with Relay URLs)",
            tag="api",
            security=KEYS,
            parameters=[
                query_param(
                    "cursor", {"type": "string", "pattern": f"^{CURSOR.pattern}$"}, "from a page link"
                )
            ],
            responses={200: json_body(PAGE), **errors(*UPSTREAM_ERRORS)},
        ),
    },
    "/api/predictions/{prediction_id}": {
        "get": operation(
            "Get a prediction from Replicate",
            tag="api",
            security=KEYS,
            parameters=[PREDICTION_ID],
            responses={200: json_body(PREDICTION), **errors(*UPSTREAM_ERRORS, 404)},
        )
    },
    "/api/predictions/{prediction_id}/cancel": {
        "post": operation(
            "Cancel a prediction",
            tag="api",
            security=KEYS,
            parameters=[PREDICTION_ID],
            responses={200: json_body(PREDICTION), **errors(*UPSTREAM_ERRORS, 404)},
        )
    },
}

routes = [
    route("/api/predictions", create_prediction, access=auth.API_KEY, methods=["POST"]),
    route("/api/predictions", list_predictions, access=auth.API_KEY, methods=["GET"]),
    route("/api/predictions/{prediction_id}", get_prediction, access=auth.API_KEY, methods=["GET"]),
    route(
        "/api/predictions/{prediction_id}/cancel", cancel_prediction, access=auth.API_KEY, methods=["POST"]
    ),
]
