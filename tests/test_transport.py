"""Writes coalesced per event-loop pass (service/web/uvicorn_internals.py) keep HTTP's order and framing."""

from __future__ import annotations

import json
import socket

from service.core.signatures import signed_headers

from .support import WEBHOOK_KEY, new_prediction_id, new_webhook_id


def raw_delivery(port: int, prediction_id: str, status: str, connection: str = "keep-alive") -> bytes:
    body = json.dumps({"id": prediction_id, "status": status}).encode()
    headers = signed_headers(WEBHOOK_KEY, new_webhook_id(), body)
    lines = [
        "POST /webhooks/replicate HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"Connection: {connection}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def acknowledgements(raw: bytes) -> list[dict]:
    """The JSON bodies of consecutive HTTP responses, each framed by its Content-Length."""
    found = []
    while raw:
        head, rest = raw.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(
            next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1]
        )
        found.append(json.loads(rest[:length]))
        raw = rest[length:]
    return found


def test_pipelined_deliveries_are_answered_in_order_and_the_last_before_the_close(relay):
    """Three requests sent in one segment, the last asking to close: three whole responses, in
    order, the connection closed only after the last one was written."""
    prediction_id = new_prediction_id()
    requests = [
        raw_delivery(relay.port, prediction_id, "starting"),
        raw_delivery(relay.port, prediction_id, "processing"),
        raw_delivery(relay.port, prediction_id, "succeeded", connection="close"),
    ]
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(b"".join(requests))
        answers = acknowledgements(read_until_closed(sock))
    seqs = [a["seq"] for a in answers]
    assert len(answers) == 3 and seqs == sorted(seqs) and len(set(seqs)) == 3
    assert not any(a["duplicate"] for a in answers)
