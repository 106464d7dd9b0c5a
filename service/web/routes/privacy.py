"""`DELETE /admin/predictions/{id}`: forget a prediction (see service.privacy.erasure)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.core.openapi import ADMIN, TOKEN_QUERY, errors, json_body, operation, path_param
from service.privacy.erasure import forgotten, plan_erasure
from service.web import auth
from service.web.auth import route
from service.web.state import relay_of


async def forget_prediction(request: Request) -> JSONResponse:
    relay = relay_of(request)
    prediction_id = request.path_params["prediction_id"]
    async with relay.pool.acquire() as conn:
        delivery = await plan_erasure(conn, relay.vault, prediction_id)
    return JSONResponse(forgotten(prediction_id, await relay.committer.submit(delivery)))


routes = [
    route("/admin/predictions/{prediction_id}", forget_prediction, access=auth.ADMIN, methods=["DELETE"])
]

FORGOTTEN = {
    "type": "object",
    "required": ["id", "erased", "seq", "already_erased"],
    "properties": {
        "id": {"type": "string"},
        "erased": {"const": True},
        "seq": {"type": "integer", "description": "the erasure event's seq"},
        "already_erased": {"type": "boolean"},
    },
}
openapi = {
    "/admin/predictions/{prediction_id}": {
        "delete": operation(
            "Forget a prediction (crypto-shredding)",
            tag="admin",
            security=[ADMIN],
            parameters=[path_param("prediction_id"), TOKEN_QUERY],
            responses={200: json_body(FORGOTTEN), **errors(400, 401, 403, 404, 409)},
        )
    }
}
