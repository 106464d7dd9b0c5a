"""The signed sender (service/net/sender.py over net/http1.py) against real local servers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

from service.core.settings import decode_webhook_secret
from service.net.sender import new_client, post_signed

from .receiver import HANG_UP, RECEIVER_SECRET, Receiver

KEY = decode_webhook_secret(RECEIVER_SECRET)
BODY = b'{"id":"p1","status":"succeeded"}'


def post(url: str, timeout: float = 5.0, times: int = 1) -> list:
    async def run() -> list:
        async with new_client(timeout, 2) as pool:
            return [
                await post_signed(pool, url, KEY, f"msg_{n}", BODY, {"relay-seq": str(n)})
                for n in range(times)
            ]

    return asyncio.run(run())


def test_a_2xx_is_delivered_signed_with_relay_seq_over_one_kept_alive_connection(receiver: Receiver):
    attempts = post(receiver.url + "/hook", times=3)
    assert all(a.ok and a.status == 200 for a in attempts)
    assert receiver.accepted_ids() == ["msg_0", "msg_1", "msg_2"] and receiver.bad_signatures == 0
    assert receiver.seqs == {"msg_0": 0, "msg_1": 1, "msg_2": 2}
    assert dict(receiver.accepted)["msg_0"] == BODY


def test_failures_say_why_and_whether_a_retry_may_help(receiver: Receiver):
    receiver.script = [(503, {"Retry-After": "7"}), (404, {}), (HANG_UP, {})]
    unavailable, missing, hung_up = post(receiver.url + "/hook", times=3)
    assert (unavailable.reason, unavailable.retry_after, unavailable.retryable) == ("HTTP 503", 7.0, True)
    assert (missing.reason, missing.retryable) == ("HTTP 404", False)
    assert hung_up.reason.startswith("network error") and hung_up.retryable
    [moved] = post(receiver.url + "/moved")
    assert moved.reason == "HTTP 302 redirect, not followed" and receiver.accepted == []


def test_a_slow_receiver_times_out(receiver: Receiver):
    receiver.delay = 1.0
    [slow] = post(receiver.url + "/hook", timeout=0.2)
    assert not slow.ok and slow.reason.startswith("timed out") and slow.retryable


def test_nobody_listening_is_a_network_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    [refused] = post(f"http://127.0.0.1:{port}/hook")
    assert refused.reason == "network error (ConnectionRefusedError)" and refused.retryable


@contextlib.contextmanager
def raw_server(answer: bytes) -> Iterator[str]:
    """A server that reads one request per connection and writes `answer` as it is, then closes."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    finally:
        server.close()


def test_chunked_and_close_delimited_answers_are_read():
    chunked = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    with raw_server(chunked) as url:
        assert [a.status for a in post(url, times=2)] == [201, 201]
    until_close = b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\nsomething broke"
    with raw_server(until_close) as url:
        [failed] = post(url)
        assert failed.reason == "HTTP 500" and failed.retryable
