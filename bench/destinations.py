"""Destinations throughput, against a ceiling, and what forwarding costs webhook ingest.

    .venv/bin/python bench/destinations.py [--events 20000] [--seconds 10]

1. Forwarding: `--events` realistic lifecycle bodies are loaded into a fresh log; a destination is
   added `from: start` to a local receiver that answers 200 at once (a separate process: asyncio
   + httptools, no signature check), and the time until its lag is 0 gives events/s.
2. Ceilings: a plain `httpx` loop (16 requests in flight, the destination default) posting the
   same signed requests (signature, `relay-seq`) to the same receiver, reading the same rows;
   and the same loop over Relay's own sender (`net.sender.post_signed`), without the log.
3. Ingest: a closed-loop generator (a separate process: raw keep-alive connections, pre-signed
   requests) posts webhooks for `--seconds` with no destination, then again while a destination
   forwards every new event; the table shows both rates and their ratio (target ≥ 80 %).
Everything runs on this machine (relay serve, embedded Postgres, receiver, generator): the
figures are what the 2 cores give to all of them together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.deliveries import bodies, raw_request
from service.core.settings import decode_webhook_secret
from service.core.signatures import signed_headers
from tests.support import ADMIN_TOKEN, WEBHOOK_KEY, Postgres, RelayProcess, relay_env

SECRET = "whsec_" + "YmVuY2gtZGVzdGluYXRpb24tc2VjcmV0LWtleS0wMQ=="
CONCURRENCY = 16
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# ---------------------------------------------------------------------------- the receiver


def receive(port: multiprocessing.Value, count: multiprocessing.Value) -> None:  # type: ignore[valid-type]
    """A receiver that answers 200 to every POST at once, counting them (a process of its own)."""
    import httptools

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            count.value += 1
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # type: ignore[attr-defined]

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", 0)
        port.value = server.sockets[0].getsockname()[1]
        await server.serve_forever()

    uvloop.run(serve())


# ---------------------------------------------------------------------------- the load generator


def generate(
    port: int, requests: list[bytes], seconds: float, connections: int, out: multiprocessing.Queue
) -> None:  # type: ignore[type-arg]
    """Closed loop: each connection sends its next pre-signed request when the last is answered."""
    import httptools

    async def run() -> int:
        done = 0
        deadline = time.monotonic() + seconds
        feed = iter(requests)

        async def connection() -> None:
            nonlocal done
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            complete = asyncio.Event()
            parser = httptools.HttpResponseParser(
                type("P", (), {"on_message_complete": lambda self: complete.set()})()
            )
            while time.monotonic() < deadline:
                request = next(feed, None)
                if request is None:
                    break
                complete.clear()
                writer.write(request)
                while not complete.is_set():
                    parser.feed_data(await reader.read(65536))
                done += 1
            writer.close()

        await asyncio.gather(*(connection() for _ in range(connections)))
        return done

    started = time.monotonic()
    sent = uvloop.run(run())
    out.put(sent / (time.monotonic() - started))


def ingest_rate(
    port: int, count: int, seconds: float, received: multiprocessing.Value
) -> tuple[float, float]:  # type: ignore[valid-type]
    """Webhooks/s ingested, and events/s the receiver got meanwhile."""
    timestamp = int(time.time())
    requests = [raw_request(WEBHOOK_KEY, port, body, timestamp) for body in bodies(count)]
    out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    process = multiprocessing.Process(target=generate, args=(port, requests, seconds, 32, out))
    before, started = received.value, time.perf_counter()
    process.start()
    rate = out.get()
    forwarded = (received.value - before) / (time.perf_counter() - started)
    process.join()
    return float(rate), forwarded


# ---------------------------------------------------------------------------- measurements


async def load_log(dsn: str, count: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        rows = []
        for body in bodies(count):
            prediction_id = json.loads(body)["id"]
            rows.append(("msg_" + uuid.uuid4().hex, prediction_id, json.loads(body)["status"], body))
        await conn.executemany(
            "INSERT INTO events (webhook_id, prediction_id, status, source, body, received_at)"
            " VALUES ($1, $2, $3, 'webhook', $4, now())",
            rows,
        )
    finally:
        await conn.close()


async def ceiling(dsn: str, url: str, key: bytes) -> float:
    """A plain httpx loop: read the rows, sign, POST, CONCURRENCY at a time."""
    conn = await asyncpg.connect(dsn)
    rows = await conn.fetch("SELECT seq, webhook_id, body FROM events ORDER BY seq")
    await conn.close()
    queue: asyncio.Queue[asyncpg.Record] = asyncio.Queue()
    for row in rows:
        queue.put_nowait(row)
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, follow_redirects=False, timeout=15) as http:

        async def worker() -> None:
            while not queue.empty():
                row = queue.get_nowait()
                headers = {
                    **signed_headers(key, row["webhook_id"], row["body"]),
                    "relay-seq": str(row["seq"]),
                }
                response = await http.post(url, content=row["body"], headers=headers)
                assert response.status_code == 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return len(rows) / (time.perf_counter() - started)


async def sender_loop(dsn: str, url: str, key: bytes) -> float:
    """Relay's own sender (net.sender.post_signed) in the same loop: the ceiling without the log."""
    from service.net.sender import new_client, post_signed

    conn = await asyncpg.connect(dsn)
    rows = await conn.fetch("SELECT seq, webhook_id, body FROM events ORDER BY seq")
    await conn.close()
    queue = list(reversed(rows))
    async with new_client(15, CONCURRENCY) as pool:

        async def worker() -> None:
            while queue:
                row = queue.pop()
                attempt = await post_signed(
                    pool, url, key, row["webhook_id"], row["body"], {"relay-seq": str(row["seq"])}
                )
                assert attempt.ok

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return len(rows) / (time.perf_counter() - started)


def forward_rate(relay: RelayProcess, url: str, count: int, received: multiprocessing.Value) -> float:  # type: ignore[valid-type]
    before = received.value
    with httpx.Client(base_url=relay.url, headers=ADMIN, timeout=30) as admin:
        started = time.perf_counter()
        added = admin.post("/admin/destinations", json={"url": url, "secret": SECRET, "from": "start"}).json()
        while received.value - before < count:
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        admin.delete(f"/admin/destinations/{added['id']}")
    return count / elapsed


def forwarding_ingest(
    relay: RelayProcess,
    url: str,
    received: multiprocessing.Value,  # type: ignore[valid-type]
    seconds: float,
) -> tuple[float, float, int, float]:
    """Ingest while a destination forwards every new event: (ingest/s, forwarded/s, lag at the
    end of ingest, seconds from then until the lag was 0)."""
    with httpx.Client(base_url=relay.url, headers=ADMIN, timeout=30) as admin:
        added = admin.post("/admin/destinations", json={"url": url, "secret": SECRET}).json()
        busy, during = ingest_rate(relay.port, INGEST_REQUESTS, seconds, received)
        started = time.perf_counter()
        lag = admin.get(f"/admin/destinations/{added['id']}").json()["lag"]
        while admin.get(f"/admin/destinations/{added['id']}").json()["lag"] > 0:
            time.sleep(0.1)
        drained = time.perf_counter() - started
        admin.delete(f"/admin/destinations/{added['id']}")
    return busy, during, lag, drained


INGEST_REQUESTS = 60_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    options = parser.parse_args()

    port, received = multiprocessing.Value("i", 0), multiprocessing.Value("q", 0)
    receiver = multiprocessing.Process(target=receive, args=(port, received), daemon=True)
    receiver.start()
    while not port.value:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port.value}/hook"

    with tempfile.TemporaryDirectory() as tmp:
        postgres = Postgres(Path(tmp))
        dsn = postgres.new_database()
        asyncio.run(load_log(dsn, options.events))
        key = decode_webhook_secret(SECRET)
        # On uvloop, like relay serve (uvicorn[standard]).
        top = uvloop.run(ceiling(dsn, url, key))
        own = uvloop.run(sender_loop(dsn, url, key))
        with RelayProcess(relay_env(dsn)) as relay:
            forwarded = forward_rate(relay, url, options.events, received)
            plain, _ = ingest_rate(relay.port, INGEST_REQUESTS, options.seconds, received)
            inline = forwarding_ingest(relay, url, received, options.seconds)
        env = relay_env(dsn, RELAY_DESTINATIONS="off")
        with RelayProcess(env) as relay:
            sender = subprocess.Popen([sys.executable, "-m", "service", "destinations", "run"], env=env)
            try:
                apart = forwarding_ingest(relay, url, received, options.seconds)
            finally:
                sender.terminate()
                sender.wait()
    receiver.terminate()

    load = os.getloadavg()[0]
    events, seconds = options.events, options.seconds
    print(f"machine: {os.cpu_count()} cores, load {load:.1f}; {events:,} events; ingest {seconds:g} s")
    print()
    print("| measure | events/s | against |")
    print("| --- | ---: | --- |")
    print(f"| plain httpx loop (ceiling), {CONCURRENCY} in flight | {top:,.0f} | |")
    print(f"| net/sender loop, no database, {CONCURRENCY} in flight | {own:,.0f} | {own / top:.1f}x httpx |")
    against = f"{forwarded / top:.1f}x httpx, {forwarded / own:.0%} of the sender loop"
    print(f"| destination, from start | {forwarded:,.0f} | {against} |")
    print(f"| webhook ingest, no destination | {plain:,.0f} | |")
    for name, (busy, during, lag, drained) in (("in relay serve", inline), ("in its own process", apart)):
        print(
            f"| webhook ingest, destination sent {name} | {busy:,.0f} | {busy / plain:.0%} of ingest alone |"
        )
        print(f"| forwarded meanwhile | {during:,.0f} | lag {lag:,} at the end, 0 after {drained:.1f} s |")


if __name__ == "__main__":
    main()
