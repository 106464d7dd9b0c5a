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
import statistics
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service import embedded  # noqa: E402
from service.auth import mint_token  # noqa: E402
from service.signatures import signed_headers  # noqa: E402
from service.simulate import lifecycle  # noqa: E402
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
    body = json.dumps({**lifecycle(prediction_id)[1], "logs": f"{step}/50\n"}).encode()
    headers = signed_headers(WEBHOOK_KEY, "msg_" + uuid.uuid4().hex, body)
    head = [f"POST /webhooks/replicate HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    received_at: dict[int, float] = field(default_factory=dict)  # seq -> wall-clock time of its message
    last_received: float = 0.0
    expected: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, text: str | bytes) -> None:
        now = time.time()
        message = json.loads(text)
        if message["type"] != "event":
            return
        self.latencies.append(now - datetime.fromisoformat(message["received_at"]).timestamp())
        self.received_at[message["seq"]] = now
        self.last_received = now
        if len(self.latencies) >= self.expected:
            self.done.set()


async def watch(
    port: int, prediction_id: str, tally: Tally, connected: asyncio.Semaphore
) -> ClientConnection:
    token = mint_token(SUBSCRIBE_KEY, prediction_id, 3600)
    async with connected:
        ws = await connect(
            f"ws://127.0.0.1:{port}/predictions/{prediction_id}/ws?token={token}", open_timeout=60
        )
        while json.loads(await ws.recv())["type"] != "caught_up":
            pass
    asyncio.get_running_loop().create_task(follow(ws, tally))
    return ws


async def follow(ws: ClientConnection, tally: Tally) -> None:
    with contextlib.suppress(Exception):
        async for text in ws:
            tally.record(text)


async def subscribe_all(port: int, predictions: list[str], tally: Tally) -> list[ClientConnection]:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    return await asyncio.gather(*(watch(port, p, tally, gate) for p in predictions))


@dataclass
class Posted:
    seconds: float
    failures: int
    acks: list[float]  # from when each request was due to its 200: the ingest (commit) latency
    acked_at: dict[int, float] = field(default_factory=dict)  # seq -> wall-clock time of its 200


async def post_at_rate(port: int, requests: list[bytes], rate: float) -> Posted:
    """Send `requests` open loop at `rate`/s over keep-alive connections."""
    start = time.monotonic() + 0.05
    next_index = iter(range(len(requests)))
    posted = Posted(0.0, 0, [])

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
            posted.failures += not head.startswith(b"HTTP/1.1 200")
        writer.close()

    await asyncio.gather(*(connection() for _ in range(POST_CONNECTIONS)))
    posted.seconds = time.monotonic() - start
    return posted


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(port: int, pid: int, subscribers: int, rate: float, seconds: float) -> dict:
    predictions = ["p" + uuid.uuid4().hex[:25] for _ in range(subscribers)]
    tally = Tally()
    sockets = await subscribe_all(port, predictions, tally)
    for phase_seconds in (WARMUP_SECONDS, seconds):
        count = int(rate * phase_seconds)
        requests = [raw_request(port, predictions[k % subscribers], k) for k in range(count)]
        tally.latencies, tally.received_at, tally.expected = [], {}, count
        tally.done.clear()
        posting_started, relay_cpu, own_cpu = time.time(), cpu_seconds(pid), cpu_seconds(os.getpid())
        posted = await post_at_rate(port, requests, rate)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.done.wait(), DRAIN_TIMEOUT)
        wall = time.time() - posting_started
        relay_cpu, own_cpu = cpu_seconds(pid) - relay_cpu, cpu_seconds(os.getpid()) - own_cpu
    await asyncio.gather(*(ws.close() for ws in sockets))
    received = len(tally.latencies)
    after_ack = [
        tally.received_at[seq] - at for seq, at in posted.acked_at.items() if seq in tally.received_at
    ]
    return {
        "subscribers": subscribers,
        "posted": count,
        "post_rate": count / posted.seconds,
        "failed_posts": posted.failures,
        "ack_p50": percentile(posted.acks, 0.50) * 1e3,
        "ack_p99": percentile(posted.acks, 0.99) * 1e3,
        "delivered": received,
        "delivered_rate": received / max(tally.last_received - posting_started, 1e-9),
        "p50": percentile(tally.latencies, 0.50) * 1e3,
        "p99": percentile(tally.latencies, 0.99) * 1e3,
        "max": max(tally.latencies) * 1e3,
        "after_ack_p50": percentile(after_ack, 0.50) * 1e3,
        "after_ack_p99": percentile(after_ack, 0.99) * 1e3,
        "relay_cpu": relay_cpu / wall * 100,
        "client_cpu": own_cpu / wall * 100,
        "mean": statistics.fmean(tally.latencies) * 1e3,
    }


async def measure_idle(port: int, pid: int, subscribers: int) -> dict:
    """RSS before and after `subscribers` idle sockets, and proof that they still receive."""
    await asyncio.sleep(1)
    before = rss_mib(pid)
    predictions = ["p" + uuid.uuid4().hex[:25] for _ in range(subscribers)]
    tally = Tally()
    started = time.monotonic()
    sockets = await subscribe_all(port, predictions, tally)
    connect_seconds = time.monotonic() - started
    await asyncio.sleep(3)
    after = rss_mib(pid)
    probes = predictions[:: max(1, subscribers // 10)]
    tally.expected = len(probes)
    await post_at_rate(port, [raw_request(port, p, 0) for p in probes], 100)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(tally.done.wait(), DRAIN_TIMEOUT)
    await asyncio.gather(*(ws.close() for ws in sockets))
    return {
        "subscribers": subscribers,
        "connect_seconds": connect_seconds,
        "rss_before": before,
        "rss_after": after,
        "per_subscriber_kib": (after - before) * 1024 / subscribers,
        "probes": f"{len(tally.latencies)}/{len(probes)}",
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


def table(rows: list[dict], idle: dict | None, rate: float, seconds: float) -> str:
    lines = [
        f"machine: {machine()}",
        f"{rate:.0f} events/s offered for {seconds:.0f} s, one subscriber per prediction, round-robin",
        "",
        "| subscribers | events posted | posted/s | webhook 200 p50 / p99 ms | delivered | messages/s "
        "| p50 ms | p99 ms | max ms | message - 200 p50 / p99 ms | CPU relay / bench % |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        failed = f" ({r['failed_posts']} not 200)" if r["failed_posts"] else ""
        lines.append(
            f"| {r['subscribers']:,} | {r['posted']:,}{failed} | {r['post_rate']:,.0f} "
            f"| {r['ack_p50']:.1f} / {r['ack_p99']:.1f} | {r['delivered']:,} "
            f"| {r['delivered_rate']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} "
            f"| {r['after_ack_p50']:.1f} / {r['after_ack_p99']:.1f} "
            f"| {r['relay_cpu']:.0f} / {r['client_cpu']:.0f} |"
        )
    if idle:
        lines += [
            "",
            "| idle subscribers | connect time s | relay RSS before MiB | after MiB | KiB per subscriber | probes delivered |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {idle['subscribers']:,} | {idle['connect_seconds']:.1f} | {idle['rss_before']:.0f} "
            f"| {idle['rss_after']:.0f} | {idle['per_subscriber_kib']:.1f} | {idle['probes']} |",
        ]
    return "\n".join(lines)


async def run(options: argparse.Namespace, port: int, pid: int) -> str:
    rows = []
    for subscribers in options.subscribers:
        rows.append(await measure(port, pid, subscribers, options.rate, options.seconds))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    idle = await measure_idle(port, pid, options.idle) if options.idle else None
    return table(rows, idle, options.rate, options.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="events posted per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--subscribers", type=int, nargs="*", default=[1, 100, 1000])
    parser.add_argument(
        "--idle", type=int, default=10_000, help="idle subscribers for the memory row (0: skip)"
    )
    options = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by relay serve
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp, relay_server(Path(tmp)) as (port, pid):
        print(uvloop.run(run(options, port, pid)))


if __name__ == "__main__":
    main()
