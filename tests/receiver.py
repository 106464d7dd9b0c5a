"""A downstream system for replay tests: a real HTTP server that verifies Standard Webhooks
signatures with the `standardwebhooks` library and records what it accepted."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

RECEIVER_SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
HANG_UP = 0  # a scripted answer: close the connection without a response


class Receiver(ThreadingHTTPServer):
    """A downstream system: verifies signatures, records what it accepted, can be scripted to
    answer with errors (or hang up) first. `/moved` redirects to `/hook`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.verifier = Webhook(RECEIVER_SECRET)
        self.lock = threading.Lock()
        self.script: list[tuple[int, dict[str, str]]] = []
        self.fail_after: int | None = None  # answer 500 once this many were accepted
        self.hold_after: int | None = None  # then hold requests until `released`, and refuse them
        self.held = threading.Event()
        self.released = threading.Event()
        self.accepted: list[tuple[str, bytes]] = []  # (webhook-id, body), in arrival order
        self.timestamps: dict[str, int] = {}  # webhook-id -> webhook-timestamp it was accepted with
        self.attempts: list[tuple[str, str]] = []  # (path, webhook-id) of every request
        self.bad_signatures = 0
        # For destinations: a rule that may answer first (webhook-id, body) -> (status, headers),
        # how long each request takes, the relay-seq of each accepted delivery, and overlaps.
        self.rule: Callable[[str, bytes], tuple[int, dict[str, str]] | None] | None = None
        self.delay = 0.0
        self.seqs: dict[str, int] = {}
        self.in_flight: set[str] = set()
        self.overlaps = 0  # requests that arrived while the same webhook-id was in flight
        self.arrivals: list[tuple[str, float]] = []  # (webhook-id, time.monotonic()) of every request

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        webhook_id = headers.get("webhook-id", "")
        with self.lock:
            self.overlaps += webhook_id in self.in_flight
            self.in_flight.add(webhook_id)
            self.arrivals.append((webhook_id, time.monotonic()))
        try:
            if self.delay:
                time.sleep(self.delay)
            return self._answer(path, headers, body)
        finally:
            with self.lock:
                self.in_flight.discard(webhook_id)

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        if self.hold_after is not None and len(self.accepted) >= self.hold_after:
            self.held.set()
            self.released.wait(30)
            return 503, {}
        with self.lock:
            self.attempts.append((path, headers.get("webhook-id", "")))
            if path == "/moved":
                return 302, {"Location": "/hook"}
            if self.script:
                return self.script.pop(0)
            ruled = self.rule(headers.get("webhook-id", ""), body) if self.rule is not None else None
            if ruled is not None:
                return ruled
            if self.fail_after is not None and len(self.accepted) >= self.fail_after:
                return 500, {}
            try:
                self.verifier.verify(body, headers, json_parse=False)
            except WebhookVerificationError:
                self.bad_signatures += 1
                return 401, {}
            self.accepted.append((headers["webhook-id"], body))
            self.timestamps[headers["webhook-id"]] = int(headers["webhook-timestamp"])
            if "relay-seq" in headers:
                self.seqs[headers["webhook-id"]] = int(headers["relay-seq"])
            return 200, {}

    def accepted_ids(self) -> list[str]:
        return [webhook_id for webhook_id, _ in self.accepted]


class ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, extra = self.server.answer(self.path, headers, body)
        if status == HANG_UP:
            self.close_connection = True
            return
        self.send_response(status)
        for name, value in {**extra, "Content-Length": "0"}.items():
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.released.set()
        server.shutdown()
        server.server_close()
        thread.join()
