"""Fan-out benchmark: webhook-received -> message-received latency, delivery rate, idle memory.

    .venv/bin/python bench/fanout.py [--rate 1000] [--seconds 10] [--subscribers 1 100 1000] [--idle 10000]

Starts a throwaway embedded PostgreSQL and a real `relay serve` (production mode: DATABASE_URL
and secrets set), then for each subscriber count N:
- connects N WebSocket subscribers, each watching its own prediction (`/predictions/{id}/ws`),
  as browsers do;
- posts signed `processing` deliveries through `POST /webhooks/replicate` at a fixed rate
  (open loop: request k is due at t0 + k/rate), spread round-robin over the N predictions;
- measures, for every message, client receive time minus the event's `received_at` (the moment
  Relay received the webhook; same machine, same clock), and messages/s delivered.
Then it connects `--idle` subscribers that receive nothing and reports the RSS of the Relay
process before and after. Prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.core.auth import mint_token  # noqa: E402
from service.core.signatures import signed_headers  # noqa: E402
from service.db import embedded  # noqa: E402
from service.ops.simulate import lifecycle  # noqa: E402
from tests.support import SUBSCRIBE_KEY, WEBHOOK_KEY, free_port, relay_env  # noqa: E402

POST_CONNECTIONS = 256
CONNECT_CONCURRENCY = 200
WARMUP_SECONDS = 1.0
DRAIN_TIMEOUT = 30.0


@contextlib.contextmanager
def relay_server(tmp: Path) -> Iterator[tuple[int, int]]:
    """An embedded Postgres and a `relay serve` on it: (port, relay pid)."""
    server = embedded.start(tmp, delete_on_exit=True)
    port = free_port()
    log = (tmp / "relay.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port)],
        env=relay_env(embedded.dsn(server)),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"relay serve did not start; see {tmp / 'relay.log'}")
            time.sleep(0.2)
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def ready(port: int) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    return False


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_request(port: int, prediction_id: str, step: int) -> bytes:
    """One signed `processing` delivery as raw HTTP/1.1 bytes (signed now: fresh timestamps)."""
    body = json.dumps({**lifecycle(prediction_id)[1], "logs": f"{step}/50\n"}).encode()
    headers = signed_headers(WEBHOOK_KEY, "msg_" + uuid.uuid4().hex, body)
    head = ["POST /webhooks/replicate HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class Tally:
    """What the subscribers received: latency from `received_at`, and when each seq arrived."""

    expected: int = 0
    latencies: list[float] = field(default_factory=list)
    arrived: dict[int, float] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self, expected: int) -> None:
        self.expected, self.latencies, self.arrived = expected, [], {}
        self.done.clear()

    def record(self, text: str | bytes) -> None:
        now = time.time()
        message = json.loads(text)
        if message["type"] != "event":
            return
        self.latencies.append(now - datetime.fromisoformat(message["received_at"]).timestamp())
        self.arrived[message["seq"]] = now
        if len(self.latencies) >= self.expected:
            self.done.set()


@dataclass
class Subscribers:
    """Open WebSocket subscribers, each with the task that reads it."""

    tally: Tally = field(default_factory=Tally)
    sockets: list[ClientConnection] = field(default_factory=list)
    readers: set[asyncio.Task] = field(default_factory=set)

    async def open(self, port: int, predictions: list[str]) -> None:
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        await asyncio.gather(*(self._open_one(port, p, gate) for p in predictions))

    async def _open_one(self, port: int, prediction_id: str, gate: asyncio.Semaphore) -> None:
        token = mint_token(SUBSCRIBE_KEY, prediction_id, 3600)
        url = f"ws://127.0.0.1:{port}/predictions/{prediction_id}/ws?token={token}"
        async with gate:
            ws = await connect(url, open_timeout=60)
            while json.loads(await ws.recv())["type"] != "caught_up":
                pass
        self.sockets.append(ws)
        self.readers.add(asyncio.create_task(self._read(ws)))

    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for text in ws:
                self.tally.record(text)

    async def wait(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.tally.done.wait(), DRAIN_TIMEOUT)

    async def close(self) -> None:
        await asyncio.gather(*(ws.close() for ws in self.sockets))
        await asyncio.gather(*self.readers)


@dataclass
class Posted:
    seconds: float = 0.0
    failures: int = 0
    acks: list[float] = field(default_factory=list)  # due -> 200: the ingest (commit) latency
    acked_at: dict[int, float] = field(default_factory=dict)  # seq -> wall-clock time of its 200


async def post_at_rate(port: int, requests: list[bytes], rate: float) -> Posted:
    """Send `requests` open loop: request k is due at t0 + k/rate, on the next free connection."""
    start = time.monotonic() + 0.05
    next_index = iter(range(len(requests)))
    posted = Posted()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for k in next_index:
            due = start + k / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(requests[k])
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            answer = await reader.readexactly(length)
            posted.acks.append(time.monotonic() - due)
            if head.startswith(b"HTTP/1.1 200"):
                posted.acked_at[json.loads(answer)["seq"]] = time.time()
            else:
                posted.failures += 1
        writer.close()

    await asyncio.gather(*(connection() for _ in range(POST_CONNECTIONS)))
    posted.seconds = time.monotonic() - start
    return posted


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1e3


@dataclass(frozen=True)
class Scenario:
    subscribers: int
    rate: float
    shared: bool  # all subscribers watch one prediction (broadcast), else one prediction each

    @property
    def label(self) -> str:
        return f"{self.subscribers:,} on one prediction" if self.shared else f"{self.subscribers:,}"


async def measure(port: int, pid: int, scenario: Scenario, seconds: float) -> dict:
    """Warm up for a second, then post for `seconds` and collect what the subscribers received."""
    count = 1 if scenario.shared else scenario.subscribers
    predictions = ["p" + uuid.uuid4().hex[:25] for _ in range(count)]
    subscribers = Subscribers()
    await subscribers.open(port, predictions * (scenario.subscribers // count))
    for phase in (WARMUP_SECONDS, seconds):
        events = int(scenario.rate * phase)
        requests = [raw_request(port, predictions[k % count], k) for k in range(events)]
        subscribers.tally.reset(events * (scenario.subscribers // count))
        started, cpu_before = time.time(), (cpu_seconds(pid), cpu_seconds(os.getpid()))
        posted = await post_at_rate(port, requests, scenario.rate)
        await subscribers.wait()
        wall = time.time() - started
        processes = (pid, os.getpid())
        cpu = [(cpu_seconds(p) - b) / wall * 100 for p, b in zip(processes, cpu_before, strict=True)]
    await subscribers.close()
    tally = subscribers.tally
    after_ack = [tally.arrived[seq] - at for seq, at in posted.acked_at.items() if seq in tally.arrived]
    return {
        "scenario": scenario.label,
        "posted": events,
        "failed_posts": posted.failures,
        "post_rate": events / posted.seconds,
        "ack_p50": percentile(posted.acks, 0.50),
        "ack_p99": percentile(posted.acks, 0.99),
        "delivered": len(tally.latencies),
        "expected": tally.expected,
        "delivered_rate": len(tally.latencies) / max(max(tally.arrived.values(), default=0) - started, 1e-9),
        "p50": percentile(tally.latencies, 0.50),
        "p99": percentile(tally.latencies, 0.99),
        "max": percentile(tally.latencies, 1.0),
        "after_ack_p50": percentile(after_ack, 0.50),
        "after_ack_p99": percentile(after_ack, 0.99),
        "relay_cpu": cpu[0],
        "bench_cpu": cpu[1],
    }


async def measure_idle(port: int, pid: int, count: int) -> dict:
    """Relay's RSS before and after `count` idle subscribers, and proof that they still receive."""
    await asyncio.sleep(1)
    before = rss_mib(pid)
    predictions = ["p" + uuid.uuid4().hex[:25] for _ in range(count)]
    subscribers = Subscribers()
    started = time.monotonic()
    await subscribers.open(port, predictions)
    connect_seconds = time.monotonic() - started
    await asyncio.sleep(3)
    after = rss_mib(pid)
    probes = predictions[:: max(1, count // 10)]
    subscribers.tally.reset(len(probes))
    await post_at_rate(port, [raw_request(port, p, 0) for p in probes], 100)
    await subscribers.wait()
    await subscribers.close()
    return {
        "subscribers": count,
        "connect_seconds": connect_seconds,
        "rss_before": before,
        "rss_after": after,
        "per_subscriber_kib": (after - before) * 1024 / count,
        "probes": f"{len(subscribers.tally.latencies)}/{len(probes)}",
    }


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, {platform.system()}"


def table(rows: list[dict], idle: dict | None, seconds: float) -> str:
    lines = [
        f"machine: {machine()}; each row: 1 s warm-up, then {seconds:.0f} s measured",
        "",
        (
            "| subscribers | events/s offered | posted/s | webhook 200 p50 / p99 ms | messages delivered "
            "| messages/s | p50 ms | p99 ms | max ms | message after 200 p50 / p99 ms | CPU relay / bench % |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        failed = f" ({r['failed_posts']} not 200)" if r["failed_posts"] else ""
        lines.append(
            f"| {r['scenario']} | {r['rate']:,.0f} | {r['post_rate']:,.0f}{failed} "
            f"| {r['ack_p50']:.1f} / {r['ack_p99']:.1f} | {r['delivered']:,} of {r['expected']:,} "
            f"| {r['delivered_rate']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} "
            f"| {r['after_ack_p50']:.1f} / {r['after_ack_p99']:.1f} "
            f"| {r['relay_cpu']:.0f} / {r['bench_cpu']:.0f} |"
        )
    if idle:
        lines += [
            "",
            (
                "| idle subscribers | connect time s | relay RSS before MiB | after MiB | KiB per subscriber "
                "| probes delivered |"
            ),
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
            (
                f"| {idle['subscribers']:,} | {idle['connect_seconds']:.1f} | {idle['rss_before']:.0f} "
                f"| {idle['rss_after']:.0f} | {idle['per_subscriber_kib']:.1f} | {idle['probes']} |"
            ),
        ]
    return "\n".join(lines)


async def run(options: argparse.Namespace, port: int, pid: int) -> str:
    scenarios = [Scenario(n, options.rate, shared=False) for n in options.subscribers]
    if options.broadcast:
        scenarios.append(Scenario(options.broadcast, options.broadcast_rate, shared=True))
    rows = []
    for scenario in scenarios:
        rows.append({**await measure(port, pid, scenario, options.seconds), "rate": scenario.rate})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    idle = await measure_idle(port, pid, options.idle) if options.idle else None
    return table(rows, idle, options.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="events posted per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--subscribers", type=int, nargs="*", default=[1, 100, 1000])
    parser.add_argument("--broadcast", type=int, default=1000, help="subscribers on one prediction (0: skip)")
    parser.add_argument("--broadcast-rate", type=float, default=20.0, help="events/s for the broadcast row")
    parser.add_argument("--idle", type=int, default=10_000, help="idle subscribers, for RSS (0: skip)")
    options = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by relay serve
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp, relay_server(Path(tmp)) as (port, pid):
        print(uvloop.run(run(options, port, pid)))


if __name__ == "__main__":
    main()
