"""`relay simulate --serve-outputs`: the simulated predictions' output files, really served.

A small HTTP origin on 127.0.0.1 serves one generated PNG per prediction at
`/outputs/<prediction id>/out-0.png` (the same bytes for the same id), so a dev instance that
allows this origin archives real files and its dashboard shows them.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import struct
import zlib

OUTPUT_PATH = re.compile(r"/outputs/([A-Za-z0-9_-]{1,64})/out-0\.png")
SIZE = 96


def png(seed: bytes, size: int = SIZE) -> bytes:
    """A valid RGB PNG: a diagonal gradient in colours derived from `seed`."""
    red, green, blue = hashlib.sha256(seed).digest()[:3]
    rows = b"".join(
        b"\x00"
        + b"".join(bytes(((red + x) % 256, (green + y) % 256, (blue + x + y) % 256)) for x in range(size))
        for y in range(size)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


class OutputServer:
    """Serves the PNGs; `served` holds the prediction ids whose file was fetched."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.served: set[str] = set()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, prediction_id: str) -> str:
        return f"{self.origin}/outputs/{prediction_id}/out-0.png"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)

    async def stop(self) -> None:
        """Stop listening and end the kept-alive connections' handlers."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                method, path = (head.split(b"\r\n", 1)[0].decode("latin-1").split(" ") + ["", ""])[:2]
                writer.write(self._answer(method, path))
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): the simulation is over; the task ends here instead of as cancelled
        finally:
            self._handlers.discard(task)
            writer.close()

    def _answer(self, method: str, path: str) -> bytes:
        match = OUTPUT_PATH.fullmatch(path)
        if method != "GET" or match is None:
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        self.served.add(match.group(1))
        body = png(match.group(1).encode())
        head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode() + body
