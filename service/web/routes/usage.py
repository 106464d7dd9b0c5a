"""`GET /admin/usage`: predictions, predict time and cost over a period (service.usage.report)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.core.auth import require_admin, token_from
from service.core.errors import InvalidRequest
from service.usage.report import UsageInputError, budget_status, period, report
from service.web.state import relay_of


async def get_usage(request: Request) -> JSONResponse:
    relay = relay_of(request)
    require_admin(token_from(request.headers, request.query_params), relay.settings.admin_token)
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


routes = [Route("/admin/usage", get_usage)]
