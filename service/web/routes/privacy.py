"""`DELETE /admin/predictions/{id}`: forget a prediction (see service.privacy.erasure)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.privacy.erasure import forgotten, plan_erasure
from service.web.auth import ADMIN, route
from service.web.state import relay_of


async def forget_prediction(request: Request) -> JSONResponse:
    relay = relay_of(request)
    prediction_id = request.path_params["prediction_id"]
    async with relay.pool.acquire() as conn:
        delivery = await plan_erasure(conn, relay.vault, prediction_id)
    return JSONResponse(forgotten(prediction_id, await relay.committer.submit(delivery)))


routes = [route("/admin/predictions/{prediction_id}", forget_prediction, access=ADMIN, methods=["DELETE"])]
