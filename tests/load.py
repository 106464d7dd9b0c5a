"""Load for fault tests: signed deliveries posted from a background thread, with a record of
every webhook-id sent and of the ones Relay acknowledged with a 2xx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from service.core.signatures import signed_headers
from service.ops.simulate import lifecycle

from .support import ADMIN_TOKEN, WEBHOOK_KEY, new_prediction_id, new_webhook_id

REQUEST_TIMEOUT = 10.0


@dataclass
class Outcome:
    status: int  # 0: no HTTP answer (connection refused or reset, or timed out)
    seconds: float
    retry_after: str | None = None
    at: float = field(default_factory=time.monotonic)


class Load:
    """`workers` concurrent senders posting lifecycles (or, with `predictions`, endless
    `processing` deliveries for those ids) to `url` until stopped. Each delivery has a fresh
    webhook-id and is sent once, so an unanswered one is simply unacknowledged."""

    def __init__(self, url: str, workers: int = 8, predictions: list[str] | None = None, pad: int = 0):
        self.url = url
        self.workers = workers
        self.predictions = predictions
        self.pad = "." * pad  # extra log text, for bigger events
        self.sent: set[str] = set()
        self.acked: dict[str, int] = {}
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT + 5)
        assert not self._thread.is_alive(), "the load generator did not stop"

    def statuses(self, since: float = 0.0) -> Counter[int]:
        return Counter(o.status for o in self.outcomes if o.at >= since)

    def wait_for_acks(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < count:
            assert time.monotonic() < deadline, f"only {len(self.acked)} of {count} acknowledged"
            time.sleep(0.02)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.workers)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits) as client:
            await asyncio.gather(*(self._worker(client) for _ in range(self.workers)))

    def _bodies(self) -> list[dict]:
        if self.predictions is None:
            return [{**body, "logs": body["logs"] + self.pad} for body in lifecycle(new_prediction_id())]
        template = lifecycle(random.choice(self.predictions))[1]
        return [{**template, "logs": f"step {random.randrange(10**6)}\n{self.pad}"}]

    async def _worker(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            for prediction in self._bodies():
                if self._stop.is_set():
                    return
                await self._post(client, json.dumps(prediction).encode())

    async def _post(self, client: httpx.AsyncClient, body: bytes) -> None:
        webhook_id = new_webhook_id()
        self.sent.add(webhook_id)
        started = time.monotonic()
        try:
            response = await client.post(
                self.url + "/webhooks/replicate",
                content=body,
                headers=signed_headers(WEBHOOK_KEY, webhook_id, body),
            )
        except httpx.HTTPError:
            self.outcomes.append(Outcome(0, time.monotonic() - started))
            await asyncio.sleep(0.05)  # the server is down: do not spin
            return
        outcome = Outcome(
            response.status_code, time.monotonic() - started, response.headers.get("retry-after")
        )
        self.outcomes.append(outcome)
        if 200 <= response.status_code < 300:
            self.acked[webhook_id] = response.json()["seq"]
        elif response.status_code == 503:
            await asyncio.sleep(0.05)


class Subscription:
    """A WebSocket subscriber in a thread, recording the seq of every event it receives."""

    def __init__(self, ws_url: str, prediction_id: str | None = None):
        path = f"/predictions/{prediction_id}/ws" if prediction_id else "/events/ws"
        self.prediction_id = prediction_id
        self.seqs: list[int] = []
        self.caught_up = threading.Event()
        self._conn = connect(f"{ws_url}{path}?token={ADMIN_TOKEN}", max_size=None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self.caught_up.wait(10), "no caught_up message"

    def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            for text in self._conn:
                message = json.loads(text)
                if message["type"] == "event":
                    self.seqs.append(message["seq"])
                elif message["type"] == "caught_up":
                    self.caught_up.set()

    def wait_for(self, expected: list[int], timeout: float = 10) -> None:
        """Until this subscriber has received exactly `expected` (fails on anything else)."""
        deadline = time.monotonic() + timeout
        while len(self.seqs) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.seqs == expected, f"got {len(self.seqs)} events, the log has {len(expected)}"

    def close(self) -> None:
        self._conn.close()
        self._thread.join(5)


async def _log_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT seq, webhook_id, prediction_id FROM events ORDER BY seq")
    finally:
        await conn.close()


def log_rows(dsn: str) -> list[asyncpg.Record]:
    return asyncio.run(_log_rows(dsn))


def assert_log_matches(load: Load, dsn: str) -> list[asyncpg.Record]:
    """Every acknowledged delivery is in the log exactly once, at the seq it was acknowledged
    with, and the log holds nothing that was not sent."""
    rows = log_rows(dsn)
    by_id = Counter(r["webhook_id"] for r in rows)
    assert all(count == 1 for count in by_id.values())
    seqs = {r["webhook_id"]: r["seq"] for r in rows}
    lost = [w for w in load.acked if w not in seqs]
    assert not lost, f"{len(lost)} acknowledged deliveries are missing from the log"
    assert all(seqs[w] == seq for w, seq in load.acked.items())
    assert set(seqs) <= load.sent, "the log holds deliveries that were never sent"
    return rows
