"""Every use of uvicorn beyond its public `Config`/`Server.run()` API, in one place.

Relay changes three things uvicorn does not let it configure:
- `RelayServer.shutdown`: WebSockets close with 1001 (going away) before uvicorn's 1012, a socket
  whose client stopped reading is dropped after SHUTDOWN_CLOSE_WAIT instead of holding the
  whole graceful timeout, and SIGTERM/SIGINT are not re-raised after a graceful shutdown (that
  would kill the process before `atexit` stops the embedded Postgres; Relay exits 0).
- `GoingAwayProtocol`: the same 1001 in each `--workers` process, where uvicorn's own server
  runs; a peer that stopped reading is dropped when its pong is late or its close cannot be sent.
- `CoalescingHttpProtocol`: one `write()` system call per event-loop pass and connection, and
  the request head bounded at RELAY_MAX_HEADER_BYTES (431), which httptools does not do.

They rely on names uvicorn does not promise to keep (listed in `REQUIRED`). `check_uvicorn()`
runs when this module is imported (by `relay serve` only), before the private modules are, and
refuses in one line an installed uvicorn that lacks one of them, instead of an ImportError's
traceback, or a failure later under load or at shutdown. pyproject.toml bounds uvicorn to the
tested versions, and requirements.lock pins the one CI and the image run.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
from collections.abc import Iterable
from types import CodeType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from service.core.errors import ConfigError
from service.core.settings import Settings
from service.web.state import Relay

SHUTDOWN_CLOSE_WAIT = 2.0
# Subscribers have nothing large to say (their messages are ignored): a bigger inbound message
# closes the socket with 1009 as soon as its frame header announces the size, before it is read.
WS_MAX_MESSAGE = 4096

# (module, class, methods it must define, instance attributes its methods must still assign).
Required = tuple[str, str, tuple[str, ...], tuple[str, ...]]
REQUIRED: tuple[Required, ...] = (
    ("uvicorn.server", "Server", ("shutdown",), ("servers", "server_state", "_captured_signals", "config")),
    (
        "uvicorn.protocols.websockets.websockets_sansio_impl",
        "WebSocketsSansIOProtocol",
        # pause_writing/writable: a socket whose client stopped reading blocks its sender instead
        # of buffering without bound (uvicorn 0.53); Relay's slow-client rule counts on it.
        ("shutdown", "stop_keepalive", "pause_writing", "keepalive_timeout", "send"),
        (
            "handshake_complete",
            "close_sent",
            "queue",
            "conn",
            "transport",
            "writable",
            "initial_response",
            "close_timer",
            "close_timeout",
            "loop",
        ),
    ),
    (
        "uvicorn.protocols.http.httptools_impl",
        "HttpToolsProtocol",
        ("connection_made", "data_received", "on_headers_complete", "on_message_complete"),
        ("loop", "config", "transport"),
    ),
    ("uvicorn.server", "ServerState", (), ("connections",)),
    ("uvicorn.supervisors", "Multiprocess", ("run",), ()),
    (
        "uvicorn.config",
        "Config",
        ("bind_socket",),
        (
            "timeout_graceful_shutdown",
            "ws_per_message_deflate",
            "ws_max_size",
            "h11_max_incomplete_event_size",
        ),
    ),
)


def _code_names(code: CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _code_names(const)
    return names


def _names_of(cls: type) -> tuple[set[str], set[str]]:
    """What a class defines along its MRO, and the attribute names its methods' code uses (an
    instance attribute such as `Server.servers` is assigned in a method, not on the class)."""
    defined: set[str] = set()
    used: set[str] = set()
    for klass in cls.__mro__:
        for name, value in vars(klass).items():
            defined.add(name)
            code = getattr(value, "__code__", None)
            if isinstance(code, CodeType):
                used |= _code_names(code)
    return defined, used


def missing_internals(required: Iterable[Required] = REQUIRED) -> list[str]:
    """The `module.Class.name`s of `required` that the installed uvicorn lacks."""
    missing = []
    for module_name, class_name, methods, attributes in required:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{class_name}")
            continue
        defined, used = _names_of(cls)
        missing.extend(f"{module_name}.{class_name}.{name}" for name in methods if name not in defined)
        missing.extend(
            f"{module_name}.{class_name}.{name}" for name in attributes if name not in used | defined
        )
    return missing


def check_uvicorn(required: Iterable[Required] = REQUIRED) -> None:
    """Refuse to start on a uvicorn that lacks what Relay relies on (one line: ConfigError)."""
    missing = missing_internals(required)
    if missing:
        raise ConfigError(
            f"the installed uvicorn {uvicorn.__version__} lacks {', '.join(missing)}, which Relay relies on; "
            "install the version pinned in requirements.lock (pip install -c requirements.lock .)"
        )


check_uvicorn()

# Imported only once the check has passed: on a uvicorn without them, the check's line is the error.
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: E402
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol  # noqa: E402
from uvicorn.supervisors import Multiprocess  # noqa: E402


def uvicorn_config(app: Starlette | str, settings: Settings, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=CoalescingHttpProtocol,  # httptools, one write() per loop pass (below)
        ws=GoingAwayProtocol,
        # One serialised message goes to many sockets: per-socket compression would redo the
        # work for every subscriber and keep zlib state (tens of KiB) per idle connection.
        ws_per_message_deflate=False,
        # Relay configures logging itself (web/logs.py): uvicorn must neither install its own
        # handlers nor reset the levels; the access log redacts tokens from query strings.
        log_config=None,
        log_level=None,
        access_log=settings.access_log,
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_interval,
        ws_max_size=WS_MAX_MESSAGE,
        # uvicorn's request-head limit (h11's); Relay's httptools protocol enforces the same
        # value itself (below), since httptools has no limit of its own.
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=10,
        **options,
    )


def run_workers(config: uvicorn.Config) -> None:
    """`config.workers` processes on one listening socket (uvicorn's supervisor, as `uvicorn
    --workers` runs it; its class is not public API)."""
    Multiprocess(config, sockets=[config.bind_socket()]).run()


class RelayServer(uvicorn.Server):
    """uvicorn closes open sockets with 1012; Relay first closes them with 1001 (going away).

    A socket whose client stopped reading cannot take that close frame, and uvicorn would wait
    its whole graceful timeout for it; after SHUTDOWN_CLOSE_WAIT Relay drops such sockets.
    uvicorn also re-raises SIGTERM/SIGINT after a graceful shutdown, which would kill the process
    before `atexit` stops the embedded Postgres; Relay exits normally (status 0) instead.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        relay = self.config.app.state.relay  # type: ignore[union-attr]
        assert isinstance(relay, Relay)
        for server in self.servers:
            server.close()  # no new socket may subscribe to a hub that is stopping
        if hasattr(relay, "hub"):
            await relay.hub.stop(1001)
            deadline = asyncio.get_running_loop().time() + SHUTDOWN_CLOSE_WAIT
            while relay.hub.all_subscribers() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
        for connection in list(self.server_state.connections):
            if isinstance(connection, WebSocketsSansIOProtocol):
                connection.transport.abort()
        await super().shutdown(sockets)
        self._captured_signals.clear()


STALLED_CLOSE_WAIT = 5.0


class GoingAwayProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, closing with 1001 (going away) at shutdown, not 1012.

    `RelayServer` closes sockets before uvicorn does; `--workers` runs uvicorn's own server in
    each worker, and there this is what a browser sees when its worker stops.
    """

    def keepalive_timeout(self) -> None:
        """uvicorn sends a close frame and `close()`s the transport when a pong is late; but a
        peer that stopped reading has a full send buffer, which a closing transport waits to
        flush forever, and the app never hears of it (the probe found 20 such sockets still
        subscribed 110 s later). Such a peer is gone: drop the connection, so `connection_lost`
        tells the app and the socket is unsubscribed."""
        super().keepalive_timeout()
        self.transport.abort()

    async def send(self, message: Any) -> None:
        """A close for a peer that stopped reading waits at most STALLED_CLOSE_WAIT for room in
        the send buffer, then drops the connection; and a sent close frame that is never
        answered ends in a drop, not in a close that waits on an unread buffer."""
        closing = message["type"] == "websocket.close" and self.handshake_complete and not self.close_sent
        if closing and self.initial_response is None and not self.writable.is_set():
            try:
                async with asyncio.timeout(STALLED_CLOSE_WAIT):
                    await self.writable.wait()
            except TimeoutError:
                self.close_sent = True
                self.transport.abort()
                return
        await super().send(message)
        if closing and self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)

    def shutdown(self) -> None:
        if not self.handshake_complete or self.close_sent:
            super().shutdown()
            return
        self.stop_keepalive()
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1001})
        self.conn.send_close(1001)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()


class CoalescingTransport:
    """A transport whose writes go out together, once per event-loop pass (see module doc)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()  # what was written before close() still goes out, as with a transport
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


HEAD_END = b"\r\n\r\n"


def head_too_large(limit: int) -> bytes:
    body = (
        b'{"error":{"code":"HEADERS_TOO_LARGE","message":"the request line and headers exceed '
        b'RELAY_MAX_HEADER_BYTES (%d bytes)"}}' % limit
    )
    return (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )


class CoalescingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a `CoalescingTransport`; a WebSocket upgrade hands the
    same wrapped transport to the WebSocket protocol, so fan-out messages coalesce too.

    It also bounds the request head (request line and headers) at RELAY_MAX_HEADER_BYTES, carried
    in uvicorn's `h11_max_incomplete_event_size`: httptools has no limit, and it gathers a
    header by concatenation, so one 128 MiB header line stalled the whole server for 12 s. The
    bytes before the blank line are counted as they arrive, before the parser sees them; past
    the limit the client gets a 431 and the connection is closed.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        self._head_limit = self.config.h11_max_incomplete_event_size or 65536
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""

    def data_received(self, data: bytes) -> None:
        if self._in_head and self._count_head(data) > self._head_limit:
            self.transport.write(head_too_large(self._head_limit))
            self.transport.close()
            self._in_head = False
            return
        super().data_received(data)

    def _count_head(self, data: bytes) -> int:
        """Add the head bytes in `data` (all of it until the blank line that ends the head)."""
        joined = self._tail + data
        end = joined.find(HEAD_END)
        self._head_bytes += len(data) if end < 0 else max(0, end + len(HEAD_END) - len(self._tail))
        self._tail = joined[-(len(HEAD_END) - 1) :]
        return self._head_bytes

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes, self._tail = True, 0, b""  # the next request on this connection
