"""Open-loop load: send pre-signed requests at a fixed rate, whatever the server's pace.

Debian ships `wrk` but not `wrk2`, and wrk is closed-loop: a slow response delays the next
request, which hides queueing (coordinated omission). Here request i is due at t0 + i/rate; it
goes out on an idle keep-alive connection, or waits for one, and its latency is measured from
when it was due, not from when it was sent. uvloop + httptools keep this cheap (~20-30 µs per
request); its own CPU time is reported so a saturated generator would be visible.

Usage: python bench/openloop.py FILE --port P --rate R --duration S [--connections C]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
from collections import deque
from pathlib import Path

import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.deliveries import read_requests

TICK = 0.001
DRAIN_TIMEOUT = 5.0  # then requests still unanswered count as failed


class Connection(asyncio.Protocol):
    def __init__(self, load: Load):
        self.load = load
        self.parser = httptools.HttpResponseParser(self)
        self.due = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.load.finished(self, self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.lost += 1

    def send(self, request: bytes, due: float) -> None:
        self.due = due
        self.transport.write(request)  # type: ignore[union-attr]


class Load:
    def __init__(self, requests: list[bytes], rate: float, duration: float):
        self.loop = asyncio.get_running_loop()
        self.requests = requests
        self.rate = rate
        self.total = min(len(requests), int(rate * duration))
        self.idle: deque[Connection] = deque()
        self.waiting: deque[tuple[bytes, float]] = deque()
        self.latencies: list[float] = []
        self.non2xx = 0
        self.lost = 0
        self.all_done = asyncio.Event()

    def finished(self, conn: Connection, status: int) -> None:
        self.latencies.append(self.loop.time() - conn.due)
        if not 200 <= status < 300:
            self.non2xx += 1
        if self.waiting:
            conn.send(*self.waiting.popleft())
        else:
            self.idle.append(conn)
        if len(self.latencies) == self.total:
            self.all_done.set()

    def dispatch(self, request: bytes, due: float) -> None:
        if self.idle:
            self.idle.popleft().send(request, due)
        else:
            self.waiting.append((request, due))

    async def run(self) -> float:
        start = self.loop.time() + 0.01
        sent = 0
        while sent < self.total:
            due_now = min(self.total, int((self.loop.time() - start) * self.rate) + 1)
            while sent < due_now:
                self.dispatch(self.requests[sent], start + sent / self.rate)
                sent += 1
            # At least 1 ms: libuv's timers have millisecond resolution, and a shorter sleep
            # would spin and take CPU from the server under test.
            await asyncio.sleep(max(TICK, start + sent / self.rate - self.loop.time()))
        sending_ended = self.loop.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_done.wait(), DRAIN_TIMEOUT)
        return sending_ended - start


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main(options: argparse.Namespace) -> dict:
    load = Load(read_requests(Path(options.file)), options.rate, options.duration)
    for _ in range(options.connections):
        _, conn = await load.loop.create_connection(lambda: Connection(load), "127.0.0.1", options.port)
        load.idle.append(conn)
    before = cpu_seconds()
    seconds = await load.run()
    used = cpu_seconds() - before
    ordered = sorted(load.latencies)
    return {
        "offered": options.rate,
        "sent": load.total,
        "completed": len(ordered),
        "seconds": seconds,
        "non2xx": load.non2xx,
        "lost_connections": load.lost,
        "p50": percentile(ordered, 0.50) * 1e3,
        "p99": percentile(ordered, 0.99) * 1e3,
        "p999": percentile(ordered, 0.999) * 1e3,
        "max": (ordered[-1] if ordered else float("nan")) * 1e3,
        "cpu_seconds": used,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--connections", type=int, default=256)
    print(json.dumps(uvloop.run(main(parser.parse_args()))), flush=True)
