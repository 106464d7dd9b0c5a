"""An origin of output files that a test controls: a real HTTP server on port 0, scripted per
path (statuses, redirects, drips, bodies cut short), recording every request it receives."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.ops import outputs

CUT = "cut"  # a scripted answer: Content-Length promised, half the body sent, connection closed
DRIP = "drip"  # a scripted answer: the body one small piece at a time, slowly (until killed)


def png(seed: int, size: int = 32) -> bytes:
    """A small valid PNG, different for each seed."""
    return outputs.png(str(seed).encode(), size)


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.lock = threading.Lock()
        self.files: dict[str, tuple[bytes, str]] = {}  # path -> (body, content type)
        self.script: dict[
            str, list[object]
        ] = {}  # path -> answers before the file (int, CUT, DRIP, "302 URL")
        self.requests: list[str] = []
        self.chunked = False  # send bodies without Content-Length
        self.delay = 0.0  # seconds before each answer
        self.drip_started = threading.Event()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, path: str, body: bytes, content_type: str = "image/png") -> str:
        self.files[path] = (body, content_type)
        return self.origin + path

    def counts(self) -> Counter[str]:
        with self.lock:
            return Counter(self.requests)

    def next_answer(self, path: str) -> object:
        with self.lock:
            self.requests.append(path)
            queue = self.script.get(path)
            return queue.pop(0) if queue else None


class FileHandler(BaseHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        answer = self.server.next_answer(self.path)
        if self.server.delay:
            time.sleep(self.server.delay)
        found = self.server.files.get(self.path)
        if isinstance(answer, int):
            self._plain(answer)
        elif isinstance(answer, str) and answer.startswith("302 "):
            self.send_response(302)
            self.send_header("Location", answer[4:])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif found is None:
            self._plain(404)
        elif answer == CUT:
            self._head(found[1], len(found[0]))
            self.wfile.write(found[0][: len(found[0]) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif answer == DRIP:
            self._head(found[1], len(found[0]))
            self.server.drip_started.set()
            for byte in found[0]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        else:
            self._body(*found)

    def _plain(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _head(self, content_type: str, length: int | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _body(self, body: bytes, content_type: str) -> None:
        if not self.server.chunked:
            self._head(content_type, len(body))
            self.wfile.write(body)
            return
        self._head(content_type, None)
        for start in range(0, len(body), 8192):
            piece = body[start : start + 8192]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")


def serving(server: FileServer) -> Iterator[FileServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def files() -> Iterator[FileServer]:
    """The test's file origin (listed explicitly, so loopback is allowed for it)."""
    yield from serving(FileServer())


@pytest.fixture
def elsewhere() -> Iterator[FileServer]:
    """An origin that is NOT allowed: it must never receive a request."""
    yield from serving(FileServer())
