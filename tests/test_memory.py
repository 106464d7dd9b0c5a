"""Memory a client can pin: inbound WS messages, subscriber queues, stalled sockets, pages, heads."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from .streams import (
    flood,
    metric,
    stream_url,
    subscribe,
    tiny_window_socket,
)
from .support import ADMIN_TOKEN, RelayProcess, new_prediction_id, post_webhook, relay_env

FLOOD = 300  # bulky (16 kB) deliveries: more than the socket buffers of a client that stopped reading


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def wait_until(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_an_inbound_message_of_a_few_kib_closes_the_socket_with_1009(relay):
    """Subscribers have nothing large to say: 5 KiB is already over the limit."""
    url = f"{relay.ws_url}/predictions/{new_prediction_id()}/ws?token={ADMIN_TOKEN}"
    with connect(url) as ws:
        ws.recv(timeout=5)  # caught_up
        ws.send("x" * 5000)
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=5)
    assert ws.close_code == 1009


def test_many_clients_sending_large_frames_leave_memory_flat(relay):
    """40 sockets each announcing a 16 MiB message are closed at the frame header; the server's
    memory hardly moves (it took 100 such clients from 410 MiB to 3.1 GiB before)."""
    before = rss_mib(relay.proc.pid)
    url = f"{relay.ws_url}/events/ws?token={ADMIN_TOKEN}"
    codes = []
    for _ in range(40):
        with connect(url, max_size=None) as ws:
            ws.recv(timeout=5)
            with contextlib.suppress(ConnectionClosed, OSError):
                ws.send("x" * (16 * 2**20))
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                while True:
                    ws.recv(timeout=5)
            codes.append(ws.close_code)
    assert set(codes) <= {1009, 1006}
    assert rss_mib(relay.proc.pid) - before < 64


@pytest.fixture(scope="module")
def tight(postgres):
    """A server with a 256 KiB byte bound per subscriber queue and a one-second ping."""
    env = relay_env(postgres.new_database(), RELAY_WS_QUEUE_BYTES=str(256 * 1024), RELAY_WS_PING="1")
    with RelayProcess(env) as process:
        yield process


def test_a_queue_is_bounded_in_bytes_too(tight):
    """A stuck socket is closed (1013) once ~256 KiB are queued for it, long before its message
    bound (RELAY_WS_QUEUE, 1000) is reached."""
    prediction_id = new_prediction_id()
    with httpx.Client(base_url=tight.url, timeout=30) as http:
        closes = metric(http, "relay_slow_client_closes_total")

        async def scenario() -> None:
            url = stream_url(tight, prediction_id)
            async with subscribe(url, sock=tiny_window_socket(tight.port), max_queue=1):
                await flood(http, prediction_id, FLOOD)  # 4.8 MB: under 1000 messages, over 256 KiB
                assert await asyncio.to_thread(
                    wait_until, lambda: metric(http, "relay_slow_client_closes_total") > closes
                )

        asyncio.run(scenario())


def test_a_stalled_socket_is_dropped_by_the_ping_timeout(postgres):
    """A socket that stopped reading (its send buffer full) is unsubscribed after the ping timeout,
    even though its queue never overflowed: 20 such sockets stayed subscribed for minutes before."""
    prediction_id = new_prediction_id()
    env = relay_env(postgres.new_database(), RELAY_WS_PING="1")
    with RelayProcess(env) as relay, httpx.Client(base_url=relay.url, timeout=30) as http:

        async def scenario() -> bool:
            url = stream_url(relay, prediction_id)
            async with subscribe(url, sock=tiny_window_socket(relay.port), max_queue=1) as stuck:
                await flood(http, prediction_id, FLOOD)  # fills the socket buffers, not the queue
                assert metric(http, "relay_slow_client_closes_total") == 0
                dropped = await asyncio.to_thread(wait_until, lambda: metric(http, "relay_subscribers") == 0)
                del stuck
                return dropped

        assert asyncio.run(scenario())
        assert metric(http, "relay_slow_client_closes_total") == 0


def large(prediction_id: str, step: int) -> dict:
    """A processing delivery of about 1 MiB of incompressible logs."""
    return {
        "id": prediction_id,
        "status": "processing",
        "logs": base64.b64encode(os.urandom(780_000)).decode(),
    }


@pytest.mark.parametrize("route", ["/predictions/{id}/events", "/admin/events"])
def test_pages_are_bounded_in_bytes_and_next_after_continues(admin, route):
    """12 events of ~1 MiB with limit=1000: each page stops near 8 MiB; paging gets them all."""
    prediction_id = new_prediction_id()
    stored = [post_webhook(admin, large(prediction_id, step)).json()["seq"] for step in range(12)]
    got, after, pages = [], 0, 0
    while True:
        params = {"after": after, "limit": 1000, "prediction_id": prediction_id}
        if route != "/admin/events":
            params.pop("prediction_id")
        page = admin.get(route.format(id=prediction_id), params=params).json()
        if not page["events"]:
            break
        pages += 1
        assert len(page["events"]) < 12 and len(page["events"]) <= 9
        got += [event["seq"] for event in page["events"]]
        after = page["next_after"]
    assert got == stored and pages >= 2


def raw_request(port: int, head: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(head)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


def test_an_oversized_request_head_is_431_and_the_server_stays_responsive(relay, client):
    """A header line past RELAY_MAX_HEADER_BYTES (64 KiB) is refused with 431 without credentials,
    while it is still arriving; a head under the limit is served."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (8 * 2**20) + b"\r\n\r\n"
    answer = raw_request(relay.port, head)
    assert answer.startswith(b"HTTP/1.1 431") and b"RELAY_MAX_HEADER_BYTES" in answer
    assert client.get("/healthz", headers={"x-pad": "a" * 60_000}).status_code == 200
    assert client.get("/healthz", headers={"x-pad": "a" * 70_000}).status_code == 431


def test_the_head_limit_is_configurable(postgres):
    env = relay_env(postgres.new_database(), RELAY_MAX_HEADER_BYTES="4096")
    with RelayProcess(env) as relay, httpx.Client(base_url=relay.url) as http:
        assert http.get("/healthz", headers={"x-pad": "a" * 3000}).status_code == 200
        refused = http.get("/healthz", headers={"x-pad": "a" * 5000})
        assert refused.status_code == 431
        assert refused.json()["error"]["code"] == "HEADERS_TOO_LARGE"
