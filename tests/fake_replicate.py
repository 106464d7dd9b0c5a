"""A stand-in for Replicate's API: a real HTTP server (Starlette on uvicorn, in a thread).

It speaks Replicate's JSON shapes for create (by version or by model), get, cancel and list,
records every request, can be told to answer the next matching requests with a scripted
failure (status, headers, body, delay), and on create sends signed webhooks (start, logs,
output, completed) to the `webhook` URL it was given, as Replicate does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from service.core.signatures import signed_headers
from service.ops.simulate import lifecycle

from .support import ROOT, WEBHOOK_KEY, RelayProcess, free_port, relay_env

TOKEN = "r8_fake_replicate_token_0123456789"
API_KEY = "relay-api-key-a-0123456789"
OTHER_API_KEY = "relay-api-key-b-0123456789"
QWEN = "qwen/qwen-image-edit-plus"
QWEN_INPUT = {"image": ["https://example.com/cat.png"], "prompt": "make it blue"}
CREATE = {"model": QWEN, "input": QWEN_INPUT}
VERSION = "5a8b5e4bd4e1b1d3b9a8c9e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5"
WEBHOOK_GAP = 0.03
PAGE_SIZE = 2
FINAL_RETRY_FOR, FINAL_RETRY_GAP = 30.0, 0.2


@dataclass
class Answer:
    """A scripted reply: `status`, `headers`, `body` (bytes or JSON), after `delay` seconds."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    delay: float = 0.0
    passthrough: bool = False  # after the delay, answer normally


@dataclass
class Seen:
    method: str
    path: str
    query: str
    json: Any
    authorization: str
    at: float


def answered_model(version: str | None, model: str | None) -> tuple[str, str]:
    """The `model` and bare `version` id Replicate's answer names, as Replicate does: the model's
    latest (VERSION) when only a model is given; a bare id other than VERSION is another model."""
    if model is not None or version is None:
        return model or QWEN, VERSION
    name, _, version_id = version.partition(":")
    if "/" in name:
        return name, version_id or VERSION
    return (QWEN, version) if version == VERSION else ("someone/unknown-model", version)


def error_body(status: int, title: str, detail: str) -> dict[str, Any]:
    return {"title": title, "detail": detail, "status": status}


class FakeReplicate:
    def __init__(self) -> None:
        self.port = 0  # the port the server bound, known once it has started
        self.predictions: dict[str, dict[str, Any]] = {}
        self.requests: list[Seen] = []
        self.scripts: deque[tuple[str, re.Pattern[str], Answer]] = deque()
        self.lose: set[str] = set()  # webhook events never delivered ("logs", "completed", ...)
        self.hold = False  # keep predictions running (before completing) until cleared or canceled
        self.outcome = "succeeded"  # how the next predictions end: succeeded, failed or canceled
        self.output: list[str] | None = None  # output URLs of the next predictions (else Replicate-like)
        self.tasks: set[asyncio.Future] = set()
        self.webhook_results: list[int] = []
        # Batches: created predictions not yet terminal, and the most there ever were at once.
        self.unfinished: set[str] = set()
        self.max_unfinished = 0
        self.created: dict[str, dict[str, Any]] = {}  # since reset: prediction id -> create request
        self.retry_final = False  # resend a failed `completed` delivery (as Replicate does) for 30 s
        self.answer_delay = 0.0  # create, start running, then wait this long before answering
        self.output_base: str | None = None  # serve outputs from here instead of replicate.delivery
        self.instant = False  # (bench) each prediction sends `start` then `completed` at once
        self._shared: httpx.AsyncClient | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return self.url + "/v1"

    # ---- scripting -------------------------------------------------------------------------
    def script(self, method: str, path_regex: str, *answers: Answer) -> None:
        """Answer the next requests matching (method, path) with `answers`, in order."""
        for answer in answers:
            self.scripts.append((method, re.compile(path_regex), answer))

    def reset(self) -> None:
        self.scripts.clear()
        self.requests.clear()
        self.lose = set()
        self.hold = False
        self.outcome = "succeeded"
        self.output = None
        self.unfinished = set()
        self.max_unfinished = 0
        self.created = {}
        self.retry_final = False
        self.answer_delay = 0.0
        self.output_base = None

    def calls(self, method: str, path_regex: str) -> list[Seen]:
        pattern = re.compile(path_regex)
        return [r for r in self.requests if r.method == method and pattern.fullmatch(r.path)]

    def _scripted(self, method: str, path: str) -> Answer | None:
        for item in self.scripts:
            if item[0] == method and item[1].fullmatch(path):
                self.scripts.remove(item)
                return item[2]
        return None

    # ---- HTTP ------------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        raw = await request.body()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        path = request.url.path.removeprefix("/v1")
        seen = Seen(
            request.method,
            path,
            request.url.query,
            parsed,
            request.headers.get("authorization", ""),
            time.monotonic(),
        )
        self.requests.append(seen)
        answer = self._scripted(request.method, path)
        if answer is not None:
            await asyncio.sleep(answer.delay)
            if not answer.passthrough:
                return self._scripted_response(answer)
        if seen.authorization != f"Bearer {TOKEN}":
            body = error_body(401, "Unauthenticated", "You did not pass a valid authentication token")
            return JSONResponse(body, status_code=401)
        response = self._route(request, path, parsed)
        if self.answer_delay and request.method == "POST" and path.endswith("/predictions"):
            await asyncio.sleep(self.answer_delay)  # the prediction exists; its answer is late
        return response

    @staticmethod
    def _scripted_response(answer: Answer) -> Response:
        if isinstance(answer.body, bytes):
            return Response(answer.body, status_code=answer.status, headers=answer.headers)
        body = answer.body if answer.body is not None else error_body(answer.status, "Scripted", "scripted")
        return JSONResponse(body, status_code=answer.status, headers=answer.headers)

    def _route(self, request: Request, path: str, body: Any) -> Response:
        method = request.method
        if method == "POST" and path == "/predictions":
            return self._create(body, None)
        if method == "POST" and (match := re.fullmatch(r"/models/([^/]+/[^/]+)/predictions", path)):
            return self._create(body, match.group(1))
        if method == "GET" and path == "/predictions":
            return self._list(request.query_params.get("cursor"))
        if match := re.fullmatch(r"/predictions/([^/]+)(/cancel)?", path):
            prediction = self.predictions.get(match.group(1))
            if prediction is None:
                return JSONResponse(error_body(404, "Not found", "Not found."), status_code=404)
            if method == "POST" and match.group(2):
                return self._cancel(prediction)
            if method == "GET" and not match.group(2):
                return JSONResponse(prediction)
        return JSONResponse(error_body(404, "Not found", "Not found."), status_code=404)

    def _create(self, body: Any, model: str | None) -> Response:
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            detail = "- input: Invalid type. Expected: object"
            return JSONResponse(error_body(422, "Input validation failed", detail), status_code=422)
        prediction_id = "p" + uuid.uuid4().hex[:25]
        bodies = lifecycle(prediction_id, self.outcome)
        for item in bodies:
            if self.output is not None and item.get("output"):
                item["output"] = list(self.output)
            named_model, version_id = answered_model(body.get("version"), model)
            item.update(
                input=body["input"],
                model=named_model,
                version=version_id,
                webhook=body.get("webhook"),
                webhook_events_filter=body.get("webhook_events_filter"),
            )
            if self.output_base and item.get("output"):
                item["output"] = [
                    url.replace("https://replicate.delivery", self.output_base) for url in item["output"]
                ]
            item["urls"] = {
                key: url.replace("https://api.replicate.com/v1", self.api_base)
                for key, url in item["urls"].items()
            }
        self.predictions[prediction_id] = bodies[0]
        self.unfinished.add(prediction_id)
        self.created[prediction_id] = body
        self.max_unfinished = max(self.max_unfinished, len(self.unfinished))
        task = asyncio.ensure_future(self._run(prediction_id, bodies, body.get("webhook"), body))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return JSONResponse(bodies[0], status_code=201)

    def _cancel(self, prediction: dict[str, Any]) -> Response:
        if prediction["status"] in ("starting", "processing"):
            prediction.update(status="canceled", completed_at=prediction["created_at"])
            self.unfinished.discard(prediction["id"])
        return JSONResponse(prediction)

    def _list(self, cursor: str | None) -> Response:
        newest_first = list(reversed(self.predictions.values()))
        offset = int(cursor) if cursor and cursor.isascii() and cursor.isdigit() else 0
        page = newest_first[offset : offset + PAGE_SIZE]

        def link(at: int) -> str:
            return f"{self.api_base}/predictions?cursor={at}"

        more = offset + PAGE_SIZE < len(newest_first)
        return JSONResponse(
            {
                "previous": link(max(0, offset - PAGE_SIZE)) if offset else None,
                "next": link(offset + PAGE_SIZE) if more else None,
                "results": page,
            }
        )

    # ---- the prediction "running" ----------------------------------------------------------
    async def _run(self, prediction_id: str, bodies: list[dict], webhook: str | None, request: dict) -> None:
        wanted = set(request.get("webhook_events_filter") or ["start", "output", "logs", "completed"])
        if self.instant:
            if self._shared is None:
                limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
                self._shared = httpx.AsyncClient(timeout=30, limits=limits)
            await self._send_all(prediction_id, [bodies[0], bodies[-1]], webhook, wanted, self._shared, 0.0)
            return
        async with httpx.AsyncClient(timeout=10) as client:
            await self._send_all(prediction_id, bodies, webhook, wanted, client, WEBHOOK_GAP)

    async def _send_all(
        self,
        prediction_id: str,
        bodies: list[dict],
        webhook: str | None,
        wanted: set[str],
        client: httpx.AsyncClient,
        gap: float,
    ) -> None:
        for index, body in enumerate(bodies):
            while index == len(bodies) - 1 and self.hold and not self._canceled(prediction_id):
                await asyncio.sleep(WEBHOOK_GAP)
            if self._canceled(prediction_id):
                body = self.predictions[prediction_id]
                index = len(bodies) - 1
            self.predictions[prediction_id] = body
            event = self._event(index, len(bodies), body)
            if event == "completed":
                self.unfinished.discard(prediction_id)  # terminal upstream before it is sent
            if webhook and event in wanted and event not in self.lose:
                await self._deliver(client, webhook, body, final=event == "completed")
            if index == len(bodies) - 1:
                return
            await asyncio.sleep(gap)

    def _canceled(self, prediction_id: str) -> bool:
        return self.predictions[prediction_id]["status"] == "canceled"

    @staticmethod
    def _event(index: int, count: int, body: dict) -> str:
        if index == 0:
            return "start"
        if index == count - 1:
            return "completed"
        return "output" if body.get("output") else "logs"

    async def _deliver(self, client: httpx.AsyncClient, url: str, body: dict, final: bool = False) -> None:
        raw = json.dumps(body).encode()
        webhook_id = "msg_" + uuid.uuid4().hex
        deadline = time.monotonic() + (FINAL_RETRY_FOR if final and self.retry_final else 0)
        while True:
            headers = signed_headers(WEBHOOK_KEY, webhook_id, raw)
            try:
                status = (await client.post(url, content=raw, headers=headers)).status_code
            except httpx.HTTPError:
                status = 0
            self.webhook_results.append(status)
            if 200 <= status < 300 or time.monotonic() >= deadline:
                return
            await asyncio.sleep(FINAL_RETRY_GAP)

    # ---- lifecycle of the server -----------------------------------------------------------
    def __enter__(self) -> FakeReplicate:
        app = Starlette(routes=[Route("/v1/{path:path}", self.handle, methods=["GET", "POST"])])
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
            ws="none",
            http="h11",
            timeout_keep_alive=75,  # as long-lived as an API's: no race on an idle connection
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake Replicate did not start")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(10)


def api_env(fake: FakeReplicate, port: int, **extra: str) -> dict[str, str]:
    """Environment additions for a `relay serve` on `port` whose upstream is `fake`."""
    return {
        "REPLICATE_API_BASE": fake.api_base,
        "REPLICATE_API_TOKEN": TOKEN,
        "RELAY_API_KEYS": f"{API_KEY} {OTHER_API_KEY}",
        "RELAY_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "RELAY_UPSTREAM_TIMEOUT": "1",
        "RELAY_UPSTREAM_RETRIES": "2",
        "RELAY_API_RATE_LIMIT": "100000",
        "RELAY_API_MAX_BODY": "65536",
        **extra,
    }


@contextlib.contextmanager
def relay_for(dsn: str, fake: FakeReplicate, **extra: str) -> Iterator[RelayProcess]:
    port = free_port()
    with RelayProcess(relay_env(dsn, **api_env(fake, port, **extra)), port=port) as relay:
        yield relay


def api_client(relay: RelayProcess, key: str = API_KEY) -> httpx.Client:
    return httpx.Client(base_url=relay.url, timeout=30, headers={"Authorization": f"Bearer {key}"})


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    """(status, code, message) of a Relay error answer."""
    error = response.json()["error"]
    return response.status_code, error["code"], error["message"]


def watch(relay: RelayProcess, ws_url: str, token: str, timeout: float = 10) -> tuple[list[dict], int | None]:
    """Every message of a prediction's stream until the server closes it, and the close code."""
    assert ws_url.startswith(relay.ws_url)
    messages = []
    with connect(f"{ws_url}?token={token}", open_timeout=timeout, close_timeout=timeout) as socket:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                messages.append(json.loads(socket.recv(timeout=deadline - time.monotonic())))
            except (ConnectionClosed, TimeoutError):
                break
        code = socket.close_code
    return messages, code


def metric(relay: RelayProcess, name: str, label: str) -> float:
    """The value of one labelled series on Relay's /metrics (0 when it has not appeared yet)."""
    for line in httpx.get(relay.url + "/metrics").text.splitlines():
        if line.startswith(f"{name}{{{label}}} "):
            return float(line.split()[-1])
    return 0.0


def reconcile_cli(relay: RelayProcess, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`relay reconcile ARGS` against the fake Replicate that `relay` uses."""
    upstream = {"REPLICATE_API_BASE": relay.env["REPLICATE_API_BASE"], "REPLICATE_API_TOKEN": TOKEN}
    variables = relay_env(relay.env["DATABASE_URL"], **{**upstream, **env})
    command = [sys.executable, "-m", "service", "reconcile", *args]
    return subprocess.run(command, env=variables, cwd=ROOT, capture_output=True, text=True, timeout=60)
