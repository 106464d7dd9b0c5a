"""Database topology benchmark: direct vs through PgBouncer, and reads on a replica vs the primary.

    .venv/bin/python bench/pooling.py [--seconds 8] [--clients 64]      (needs pgbouncer)

Starts a throwaway embedded PostgreSQL, PgBouncer in transaction mode in front of it and a
streaming standby of it (`pg_basebackup -R`), then, in one run:
- ingest: closed loop of `--clients` raw keep-alive connections posting distinct pre-signed
  deliveries for `--seconds` to `relay serve` with DATABASE_URL direct (the ceiling) and through PgBouncer
  (RELAY_DATABASE_POOLER=transaction, LISTEN direct): deliveries/s;
- fan-out latency in each setup: an all-events WebSocket subscriber, deliveries at 200/s, time
  from sending the POST to the event on the socket (p50/p99);
- connections: server connections to Postgres held while the load runs, and how many of them
  the Relay process holds (directly, or through PgBouncer's server pool);
- reads while ingest runs: `relay export` of the whole log against the primary vs the standby
  (RELAY_READ_DATABASE_URL), and the ingest rate measured during each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench.deliveries import bodies, raw_request  # noqa: E402
from bench.destinations import generate  # noqa: E402
from service.core.signatures import signed_headers  # noqa: E402
from service.ops.simulate import lifecycle  # noqa: E402
from tests.databases import Standby, pgbouncer, wait_for_replay  # noqa: E402
from tests.support import (  # noqa: E402
    ADMIN_TOKEN,
    WEBHOOK_KEY,
    Postgres,
    RelayProcess,
    query,
    relay_env,
    with_database,
)

FANOUT_RATE = 200.0


def delivery() -> tuple[bytes, dict[str, str]]:
    prediction_id = "p" + uuid.uuid4().hex[:25]
    body = json.dumps(lifecycle(prediction_id)[1]).encode()
    return body, signed_headers(WEBHOOK_KEY, "msg_" + uuid.uuid4().hex, body)


async def closed_loop(relay: RelayProcess, clients: int, seconds: float) -> float:
    """Deliveries acknowledged per second: `clients` raw keep-alive connections replaying
    pre-signed requests back to back, from a process of their own (bench/destinations.py's
    generator), so the load generator is not the limit."""
    requests = [raw_request(WEBHOOK_KEY, relay.port, body, int(time.time())) for body in bodies(40_000)]
    out: multiprocessing.Queue[float] = multiprocessing.Queue()
    process = multiprocessing.Process(target=generate, args=(relay.port, requests, seconds, clients, out))
    process.start()
    rate = await asyncio.to_thread(out.get)
    process.join()
    return float(rate)


async def fanout_latency(relay: RelayProcess, seconds: float) -> tuple[float, float]:
    """p50 and p99 (ms) from sending a delivery to its event on an all-events socket (ingest,
    commit, NOTIFY, the hub's read and the frame), at FANOUT_RATE deliveries/s."""
    acked: dict[int, float] = {}
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=relay.url) as http:  # the log's head, to stream from
        body, headers = delivery()
        head = (await http.post("/webhooks/replicate", content=body, headers=headers)).json()["seq"]
    async with connect(f"{relay.ws_url}/events/ws?token={ADMIN_TOKEN}&after={head}") as ws:
        assert json.loads(await ws.recv())["type"] == "caught_up"

        async def read() -> None:
            async for text in ws:
                message = json.loads(text)
                if message["type"] == "event":
                    arrived = time.monotonic()
                    while message["seq"] not in acked:
                        await asyncio.sleep(0.001)
                    latencies.append(arrived - acked[message["seq"]])  # POST sent -> on the socket

        reader = asyncio.create_task(read())
        async with httpx.AsyncClient(base_url=relay.url) as http:
            for _ in range(int(seconds * FANOUT_RATE)):
                body, headers = delivery()
                sent = time.monotonic()
                answer = await http.post("/webhooks/replicate", content=body, headers=headers)
                acked[answer.json()["seq"]] = sent
                await asyncio.sleep(1 / FANOUT_RATE)
        await asyncio.sleep(1)
        reader.cancel()
    ordered = sorted(latencies)
    return ordered[len(ordered) // 2] * 1e3, ordered[int(len(ordered) * 0.99)] * 1e3


def server_connections(admin_dsn: str, database: str) -> int:
    return query(admin_dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database)[0][0]


def export_seconds(env: dict[str, str], out: Path) -> float:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "service", "export", "--quiet", "-o", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return time.monotonic() - started


@contextmanager
def topology(tmp: Path) -> Iterator[tuple[Postgres, str, Standby]]:
    postgres = Postgres(tmp / "primary", own=True)
    try:
        with pgbouncer(postgres, tmp) as bouncer:
            standby = Standby(postgres, tmp / "replica")
            try:
                yield postgres, bouncer, standby
            finally:
                standby.stop()
    finally:
        postgres.stop_server()


async def ingest_with_export(
    relay: RelayProcess, env: dict[str, str], options: argparse.Namespace, out: Path
):
    load = asyncio.create_task(closed_loop(relay, options.clients, options.seconds))
    await asyncio.sleep(options.seconds / 4)
    seconds = await asyncio.to_thread(export_seconds, env, out)
    return await load, seconds


def run(options: argparse.Namespace, tmp: Path) -> list[str]:
    rows = []
    with topology(tmp) as (postgres, bouncer, standby):
        for label in ("direct (ceiling)", "PgBouncer, transaction mode"):
            dsn = postgres.new_database()
            name = dsn.split("?")[0].rsplit("/", 1)[1]
            env = relay_env(dsn)
            if label.startswith("PgBouncer"):
                env = relay_env(
                    bouncer + name, RELAY_DATABASE_POOLER="transaction", RELAY_LISTEN_DATABASE_URL=dsn
                )
            with RelayProcess(env) as relay:
                asyncio.run(closed_loop(relay, options.clients, 1.0))  # warm-up
                rate = asyncio.run(closed_loop(relay, options.clients, options.seconds))
                held = server_connections(postgres.admin_dsn, name)
                p50, p99 = asyncio.run(fanout_latency(relay, options.seconds / 2))
            rows.append(f"| {label} | {rate:,.0f} | {p50:.1f} | {p99:.1f} | {held} |")
        dsn = postgres.new_database()
        name = dsn.split("?")[0].rsplit("/", 1)[1]
        reads = []
        with RelayProcess(relay_env(dsn)) as relay:
            asyncio.run(closed_loop(relay, options.clients, options.seconds))  # a log to read
            wait_for_replay(dsn, standby.dsn(name))
            for label, read_env in (
                ("primary", relay_env(dsn)),
                ("standby", relay_env(dsn, RELAY_READ_DATABASE_URL=with_database(standby.admin_dsn, name))),
            ):
                rate, seconds = asyncio.run(
                    ingest_with_export(relay, read_env, options, tmp / f"{label}.jsonl")
                )
                lines = sum(1 for _ in (tmp / f"{label}.jsonl").open())
                reads.append(f"| `relay export` on the {label} | {lines:,} | {seconds:.2f} | {rate:,.0f} |")
    return rows, reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=64)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows, reads = run(options, Path(tmp))
    load = os.getloadavg()[0]
    print(f"{platform.node()}: {os.cpu_count()} CPUs, load {load:.1f}; {options.clients} clients, ", end="")
    print(f"{options.seconds:g} s per load phase")
    print("\n| setup | deliveries/s | POST to socket p50 ms | p99 ms | server connections held |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print("\n| read while ingesting | events | seconds | ingest deliveries/s meanwhile |")
    print("| --- | ---: | ---: | ---: |")
    print("\n".join(reads))


if __name__ == "__main__":
    main()
