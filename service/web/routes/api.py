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
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.core.auth import matches_any, mint_token
from service.core.errors import InvalidRequest, NotFound, RelayError
from service.core.validation import check_prediction_id, create_request
from service.db import owners
from service.upstream import ratelimit
from service.upstream.client import Upstream, list_page
from service.upstream.ratelimit import Quota
from service.web.auth import API_KEY, route, token_of
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
        return json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidRequest("the body is not valid JSON") from None


async def create_prediction(request: Request) -> JSONResponse:
    upstream, quota, caller = await admit(request)
    path, payload = create_request(await read_json(request), relay_of(request).settings.webhook_url)
    reply = await upstream.create(path, payload)
    prediction_id = reply.data.get("id")
    if isinstance(prediction_id, str):
        await owners.record_owner(relay_of(request).pool, prediction_id, caller)
    return JSONResponse(with_relay(request, reply.data), status_code=201, headers=quota.headers())


async def get_prediction(request: Request) -> JSONResponse:
    upstream, quota, caller = await admit(request)
    reply = await upstream.get(await require_owned(request, caller, quota))
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


routes = [
    route("/api/predictions", create_prediction, access=API_KEY, methods=["POST"]),
    route("/api/predictions", list_predictions, access=API_KEY, methods=["GET"]),
    route("/api/predictions/{prediction_id}", get_prediction, access=API_KEY, methods=["GET"]),
    route("/api/predictions/{prediction_id}/cancel", cancel_prediction, access=API_KEY, methods=["POST"]),
]
