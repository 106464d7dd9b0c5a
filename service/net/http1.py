"""A small HTTP/1.1 client for POSTing events to receivers: keep-alive connections per origin,
responses parsed with httptools (uvicorn's parser), nothing else.

Why not httpx: posting a small body to a local receiver cost httpx 1-2 ms of CPU per request on
this machine, against ~35 µs here (bench/destinations.py); at thousands of events a second that
CPU is taken from webhook ingest in the same process. What a receiver needs from us is small:
POST, a status line, `Retry-After`, no redirects followed, a deadline. No proxies, no cookies,
no HTTP/2; TLS through `ssl` with the system's trust store and hostname checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

READ_SIZE = 65536
MAX_RESPONSE_BODY = 1024 * 1024  # more than this and the connection is dropped after the status


class ConnectionClosed(ConnectionError):
    """The receiver closed the connection before a complete answer."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


@functools.lru_cache(maxsize=256)
def split(url: str) -> tuple[Origin, str]:
    """The origin and the request target (path and query) of an http(s) URL; ValueError if not one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL with a host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.scheme, parts.hostname, port), target


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body_size: int = 0
    complete: bool = False
    headers_done: bool = False
    keep_alive: bool = False
    parser: httptools.HttpResponseParser | None = field(default=None, repr=False)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        # Read here: once the message is complete the parser has moved on to the next one.
        assert self.parser is not None
        self.status = self.parser.get_status_code()
        self.keep_alive = bool(self.parser.should_keep_alive())
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)

    def on_message_complete(self) -> None:
        self.complete = True


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.used = False

    async def exchange(self, request: bytes) -> tuple[Response, bool]:
        """Send one request and read its answer; (answer, whether the connection may be reused)."""
        self.writer.write(request)
        response = Response()
        response.parser = parser = httptools.HttpResponseParser(response)
        while not response.complete:
            data = await self.reader.read(READ_SIZE)
            if not data:
                if response.headers_done:  # an answer delimited by the end of the connection
                    return response, False
                raise ConnectionClosed("the connection closed before an answer")
            parser.feed_data(data)
            if response.body_size > MAX_RESPONSE_BODY and response.headers_done:
                return response, False
        self.used = True
        return response, response.keep_alive

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Pool:
    """Keep-alive connections per origin, at most `connections` of them busy at once.

    `connect_to(host, port)`, when given, names the address each new connection opens (a guard
    that checks it, net/guard.py `public_only`); TLS still verifies the host's own name."""

    def __init__(
        self,
        timeout: float,
        connections: int,
        connect_to: Callable[[str, int], Awaitable[str]] | None = None,
    ):
        self.timeout = timeout
        self.connections = connections
        self._connect_to = connect_to
        self._idle: dict[Origin, list[Connection]] = defaultdict(list)
        self._slots: dict[Origin, asyncio.Semaphore] = {}
        self._tls: ssl.SSLContext | None = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        """POST `body`; the answer's status and headers. Raises TimeoutError after `timeout`
        seconds, OSError (ConnectionClosed included) or httptools.HttpParserError otherwise."""
        origin, target = split(url)
        lines = [f"POST {target} HTTP/1.1", f"Host: {origin.host_header}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        slots = self._slots.setdefault(origin, asyncio.Semaphore(self.connections))
        async with slots, asyncio.timeout(self.timeout):
            while True:
                connection = await self._connection(origin)
                reused = connection.used
                try:
                    response, keep = await connection.exchange(request)
                except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
                    connection.close()
                    if reused:
                        continue  # the receiver closed an idle connection: once more on a new one
                    raise
                except BaseException:
                    connection.close()
                    raise
                if keep:
                    self._idle[origin].append(connection)
                else:
                    connection.close()
                return response

    async def _connection(self, origin: Origin) -> Connection:
        idle = self._idle[origin]
        while idle:
            connection = idle.pop()
            if not connection.reader.at_eof() and not connection.writer.is_closing():
                return connection
            connection.close()
        tls = self._tls_context() if origin.scheme == "https" else None
        address = (
            origin.host if self._connect_to is None else await self._connect_to(origin.host, origin.port)
        )
        reader, writer = await asyncio.open_connection(
            address, origin.port, ssl=tls, server_hostname=origin.host if tls else None
        )
        return Connection(reader, writer)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
