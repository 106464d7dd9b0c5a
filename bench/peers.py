"""The comparison servers, run on uvicorn with the same options as `relay serve`.

- `ceiling`: a bare Starlette endpoint that reads the body and answers 204. Nothing useful
  can be faster on this stack.
- `naive`: what a user would write instead of Relay, as tutorials show: verify with the
  `standardwebhooks` library, then one autocommit INSERT per request (jsonb body, dedupe by
  webhook-id), then 200. Durable too, but each request pays its own commit.

Usage: python bench/peers.py {ceiling,naive} --port P [--dsn DSN --secret whsec_...]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import uvicorn
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

NAIVE_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhooks (
    id            bigserial PRIMARY KEY,
    webhook_id    text UNIQUE NOT NULL,
    prediction_id text NOT NULL,
    status        text NOT NULL,
    payload       jsonb NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now()
)
"""
NAIVE_INSERT = """
INSERT INTO webhooks (webhook_id, prediction_id, status, payload) VALUES ($1, $2, $3, $4::jsonb)
ON CONFLICT (webhook_id) DO NOTHING
"""


async def empty(request: Request) -> Response:
    await request.body()
    return Response(status_code=204)


def ceiling_app() -> Starlette:
    return Starlette(routes=[Route("/webhooks/replicate", empty, methods=["POST"])])


def naive_app(dsn: str, secret: str) -> Starlette:
    webhook = Webhook(secret)
    state: dict[str, asyncpg.Pool] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["pool"] = await asyncpg.create_pool(dsn)
        await state["pool"].execute(NAIVE_SCHEMA)
        yield
        await state["pool"].close()

    async def receive(request: Request) -> Response:
        body = await request.body()
        try:
            payload = webhook.verify(body, dict(request.headers))
        except WebhookVerificationError:
            return JSONResponse({"error": "invalid signature"}, status_code=401)
        await state["pool"].execute(
            NAIVE_INSERT, request.headers["webhook-id"], payload["id"], payload["status"], body.decode()
        )
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/webhooks/replicate", receive, methods=["POST"])], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("app", choices=["ceiling", "naive"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn")
    parser.add_argument("--secret")
    options = parser.parse_args()
    app = ceiling_app() if options.app == "ceiling" else naive_app(options.dsn, options.secret)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=options.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
