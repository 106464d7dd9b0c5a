"""`GET /admin/usage`: predictions, predict time and cost over a period (service.usage.report)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.core.errors import InvalidRequest
from service.core.openapi import ADMIN, TOKEN_QUERY, errors, json_body, operation, query_param
from service.usage.report import GROUPS, UsageInputError, budget_status, period, report
from service.web import auth
from service.web.auth import route
from service.web.state import relay_of


async def get_usage(request: Request) -> JSONResponse:
    relay = relay_of(request)
    params = request.query_params
    try:
        when = period(params.get("since"), params.get("until"), params.get("group"))
    except UsageInputError as error:
        raise InvalidRequest(str(error)) from None
    settings = relay.settings
    async with relay.read_pool.acquire() as conn:
        body = await report(conn, when, settings.prices)
        body["this_month"] = await budget_status(conn, settings.prices, settings.budget)
    return JSONResponse(body)


routes = [route("/admin/usage", get_usage, access=auth.ADMIN)]

MOMENT = {"anyOf": [{"format": "date"}, {"format": "date-time"}], "type": "string", "description": "ISO 8601"}
USAGE = {
    "type": "object",
    "required": ["since", "until", "group", "currency", "groups", "total", "cached", "this_month"],
    "properties": {
        "since": {"type": "string"},
        "until": {"type": "string"},
        "group": {"enum": list(GROUPS)},
        "currency": {"const": "USD"},
        "groups": {"type": "array", "items": {"type": "object"}},
        "total": {"type": "object"},
        "cached": {
            "type": "object",
            "required": ["answers", "predict_time_saved", "cost_saved", "groups"],
            "properties": {
                "answers": {"type": "integer"},
                "predict_time_saved": {"type": "number"},
                "cost_saved": {"type": ["number", "null"]},
                "groups": {"type": "array", "items": {"type": "object"}},
            },
        },
        "this_month": {"type": "object"},
    },
}
openapi = {
    "/admin/usage": {
        "get": operation(
            "Predictions, predict time, cost, and what the cache saved",
            tag="admin",
            security=[ADMIN],
            parameters=[
                query_param("since", MOMENT, "default: the start of this UTC month"),
                query_param("until", MOMENT, "exclusive; default: now"),
                query_param("group", {"enum": list(GROUPS)}),
                TOKEN_QUERY,
            ],
            responses={200: json_body(USAGE), **errors(400, 401, 403)},
        )
    }
}
