"""One `write()` system call per event-loop pass and connection, instead of one per ASGI message.

uvicorn writes a response's status line and headers, then its body, as two `transport.write`
calls, and uvloop sends each at once: two system calls per webhook acknowledgement, which took
~17% of the server's CPU in the ingest benchmark (py-spy). The same holds for a subscriber that
is sent several events in one pass. `CoalescingTransport` gathers the writes made during one pass
of the event loop and sends them together at its end; order is kept and nothing waits longer
than the rest of the current pass.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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
