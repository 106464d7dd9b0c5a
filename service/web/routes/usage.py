"""`GET /admin/usage`: predictions, predict time and cost over a period (service.usage.report)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.core.errors import InvalidRequest
from service.usage.report import UsageInputError, budget_status, period, report
from service.web.auth import ADMIN, route
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


routes = [route("/admin/usage", get_usage, access=ADMIN)]
