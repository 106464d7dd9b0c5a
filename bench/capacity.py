"""The figures behind docs/scaling.md: Relay's append ceiling in Postgres, and fan-out cost.

Usage:  .venv/bin/python bench/capacity.py [--seconds 3] [--events 2000]

1. Append ceiling: `store.append` in a transaction (the advisory lock, INSERT, projection
   upsert, pg_notify, COMMIT: what the group committer runs with encryption on; without it the
   same statement is autocommitted) from C connections with batches of B
   simulated deliveries (~1.5 KB bodies), for a fixed time. No HTTP: this is the database's
   share of the work and the ceiling every instance together shares.
2. Fan-out: one `relay serve`, S subscribers on `/events/ws`; E events appended straight to the
   log in batches of 100; time until every subscriber has received all E. Messages/s = S*E/t.
   The subscribers run in this process on the same cores as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pgceiling import rows_per_second  # noqa: E402
from service.db import store  # noqa: E402
from service.ingest.committer import delivery_from  # noqa: E402
from service.ops.simulate import lifecycle  # noqa: E402
from tests.support import (  # noqa: E402
    ADMIN_TOKEN,
    Postgres,
    RelayProcess,
    new_prediction_id,
    new_webhook_id,
    relay_env,
)

APPEND_SETUPS = [(1, 1), (4, 1), (1, 10), (4, 10), (1, 100), (4, 100)]
BODIES = [json.dumps(b).encode() for b in lifecycle("p" + "0" * 25)]


def deliveries(count: int) -> list[store.Delivery]:
    result = []
    while len(result) < count:
        prediction_id = new_prediction_id()
        for raw in BODIES:
            body = json.loads(raw) | {"id": prediction_id}
            encoded = json.dumps(body).encode()
            result.append(delivery_from(body, encoded, webhook_id=new_webhook_id(), source="webhook"))
    return result[:count]


async def append_rate(dsn: str, connections: int, batch: int, seconds: float) -> float:
    pool = deliveries(batch * 50)

    async def write(conn: asyncpg.Connection, _index: int) -> int:
        fresh = [store.Delivery(**{**d.__dict__, "webhook_id": new_webhook_id()}) for d in pool[:batch]]
        async with conn.transaction():
            await store.append(conn, fresh)
        return batch

    return await rows_per_second(dsn, connections, seconds, write)


async def fanout_rate(relay: RelayProcess, dsn: str, subscribers: int, events: int) -> float:
    received = [0] * subscribers
    ready = asyncio.Event()
    connected = [0]
    finished = asyncio.Event()
    url = f"{relay.ws_url}/events/ws?token={ADMIN_TOKEN}&after={await current_seq(dsn)}"

    async def follow(index: int) -> None:
        async with connect(url, max_size=None) as socket:
            async for text in socket:
                if '"caught_up"' in text[:40]:
                    connected[0] += 1
                    if connected[0] == subscribers:
                        ready.set()
                    continue
                received[index] += 1
                if received[index] == events:
                    if all(count >= events for count in received):
                        finished.set()
                    return

    followers = [asyncio.create_task(follow(i)) for i in range(subscribers)]
    await ready.wait()
    batch = deliveries(events)
    conn = await asyncpg.connect(dsn)
    started = time.monotonic()
    for first in range(0, events, 100):
        async with conn.transaction():
            await store.append(conn, batch[first : first + 100])
    await finished.wait()
    elapsed = time.monotonic() - started
    await conn.close()
    await asyncio.gather(*followers)
    return subscribers * events / elapsed


async def current_seq(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await store.max_seq(conn)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--skip-append", action="store_true", help="only measure fan-out")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        postgres = Postgres(Path(tmp))
        print("| append path: connections x batch | events/s |")
        print("| --- | ---: |")
        for connections, batch in [] if options.skip_append else APPEND_SETUPS:
            rate = asyncio.run(append_rate(postgres.new_database(), connections, batch, options.seconds))
            print(f"| {connections} x {batch} | {rate:,.0f} |", flush=True)
        dsn = postgres.new_database()
        with RelayProcess(relay_env(dsn, RELAY_WS_QUEUE=str(options.events * 2))) as relay:
            print(f"\n| subscribers on one instance ({options.events} events) | messages/s | events/s |")
            print("| ---: | ---: | ---: |")
            for subscribers in (1, 10, 50, 200):
                rate = asyncio.run(fanout_rate(relay, dsn, subscribers, options.events))
                print(f"| {subscribers} | {rate:,.0f} | {rate / subscribers:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
