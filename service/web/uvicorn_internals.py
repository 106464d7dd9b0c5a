"""Every use of uvicorn beyond its public `Config`/`Server.run()` API, in one place.

Relay changes three things uvicorn does not let it configure:
- `RelayServer.shutdown`: WebSockets close with 1001 (going away) before uvicorn's 1012, a socket
  whose client stopped reading is dropped after SHUTDOWN_CLOSE_WAIT instead of holding the
  whole graceful timeout, and SIGTERM/SIGINT are not re-raised after a graceful shutdown (that
  would kill the process before `atexit` stops the embedded Postgres; Relay exits 0).
- `GoingAwayProtocol`: the same 1001 in each `--workers` process, where uvicorn's own server runs.
- `CoalescingHttpProtocol`: one `write()` system call per event-loop pass and connection.

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

# (module, class, methods it must define, instance attributes its methods must still assign).
Required = tuple[str, str, tuple[str, ...], tuple[str, ...]]
REQUIRED: tuple[Required, ...] = (
    ("uvicorn.server", "Server", ("shutdown",), ("servers", "server_state", "_captured_signals", "config")),
    (
        "uvicorn.protocols.websockets.websockets_sansio_impl",
        "WebSocketsSansIOProtocol",
        # pause_writing/writable: a socket whose client stopped reading blocks its sender instead
        # of buffering without bound (uvicorn 0.53); Relay's slow-client rule counts on it.
        ("shutdown", "stop_keepalive", "pause_writing"),
        ("handshake_complete", "close_sent", "queue", "conn", "transport", "writable"),
    ),
    ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol", ("connection_made",), ("loop",)),
    ("uvicorn.server", "ServerState", (), ("connections",)),
    ("uvicorn.supervisors", "Multiprocess", ("run",), ()),
    ("uvicorn.config", "Config", ("bind_socket",), ("timeout_graceful_shutdown", "ws_per_message_deflate")),
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
        access_log=False,  # query strings can carry tokens
        log_level="warning",
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_interval,
        timeout_graceful_shutdown=10,
        **options,
    )


def run_workers(config: uvicorn.Config) -> None:
    """`config.workers` processes on one listening socket (uvicorn's supervisor, as `uvicorn
    --workers` runs it; its class is not public API)."""
    Multiprocess(config, sockets=[config.bind_socket()]).run()


class RelayServer(uvicorn.Server):
    """uvicorn's server with Relay's shutdown (see module doc)."""

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


class GoingAwayProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, closing with 1001 (going away) at shutdown, not 1012.

    `RelayServer` closes sockets before uvicorn does; `--workers` runs uvicorn's own server in
    each worker, and there this is what a browser sees when its worker stops.
    """

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
    """A transport whose writes made during one pass of the event loop go out together.

    uvicorn writes a response's status line and headers, then its body, as two `transport.write`
    calls, and uvloop sends each at once: two system calls per webhook acknowledgement, which
    took ~17% of the server's CPU in the ingest benchmark (py-spy). The same holds for a
    subscriber sent several events in one pass. Order is kept, and nothing waits longer than
    the rest of the current pass.
    """

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

    def writelines(self, chunks: Iterable[bytes]) -> None:
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


class CoalescingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a `CoalescingTransport`; a WebSocket upgrade hands the
    same wrapped transport to the WebSocket protocol, so fan-out messages coalesce too."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
