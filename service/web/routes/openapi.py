"""`GET /openapi.json`: the OpenAPI 3.1 document, merged once at start-up from the route modules."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from service.core.openapi import json_body, operation
from service.web import auth
from service.web.auth import route


async def openapi_json(request: Request) -> Response:
    return Response(request.app.state.openapi_json, media_type="application/json")


routes = [route("/openapi.json", openapi_json, access=auth.PUBLIC)]

openapi = {
    "/openapi.json": {
        "get": operation(
            "This document",
            tag="meta",
            responses={200: json_body({"type": "object", "required": ["openapi", "paths"]}, "OpenAPI 3.1")},
        )
    }
}
