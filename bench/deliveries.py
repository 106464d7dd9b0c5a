"""Pre-signed, distinct webhook deliveries written as raw HTTP requests for the load generators.

File format (read by `replay.lua` and `openloop.py`): for each request, its length in bytes in
ASCII, a newline, then the raw request bytes. Bodies are realistic Replicate lifecycles.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from service.core.signatures import signed_headers
from service.ops.simulate import lifecycle

PATH = "/webhooks/replicate"


def bodies(count: int) -> Iterator[bytes]:
    """`count` bodies: whole prediction lifecycles (starting … succeeded), each prediction new."""
    made = 0
    while made < count:
        for body in lifecycle("p" + uuid.uuid4().hex[:25]):
            if made == count:
                return
            yield json.dumps(body).encode()
            made += 1


def raw_request(key: bytes, port: int, body: bytes, timestamp: int) -> bytes:
    headers = signed_headers(key, "msg_" + uuid.uuid4().hex, body, timestamp)
    lines = [f"POST {PATH} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def write_requests(path: Path, key: bytes, port: int, count: int) -> Path:
    """Sign `count` distinct deliveries now (so their timestamps are fresh) into `path`."""
    timestamp = int(time.time())
    with path.open("wb") as out:
        for body in bodies(count):
            request = raw_request(key, port, body, timestamp)
            out.write(b"%d\n" % len(request))
            out.write(request)
    return path


def read_requests(path: Path) -> list[bytes]:
    data, requests, at = path.read_bytes(), [], 0
    while at < len(data):
        newline = data.index(b"\n", at)
        length = int(data[at:newline])
        requests.append(data[newline + 1 : newline + 1 + length])
        at = newline + 1 + length
    return requests
