"""Batches: how fast Relay schedules a large batch, its CPU per item, and its upstream requests
per item, against the seed's approach (poll every prediction each second) on the same fake.

Usage:  .venv/bin/python bench/batches.py [--items 5000] [--seed-items 1000] [--concurrency 50]

Both run against tests/fake_replicate.py (a real HTTP server) in `instant` mode: a prediction
sends `start` and `completed` as soon as it is created. Relay (`relay serve`, its own process,
embedded Postgres) takes one `POST /api/batches`; the scheduler creates items as webhooks report
earlier ones ended. The seed's approach creates predictions itself, at most `--concurrency` in
flight, and GETs each one every second until it ends; it runs on `--seed-items` items, since its
pace is set by the one-second poll, and its per-item figures do not depend on the count.
The ceiling checked: Relay makes exactly one upstream request per item (its create), no polls.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.batch_support import qwen_inputs  # noqa: E402
from tests.fake_replicate import QWEN, TOKEN, FakeReplicate, api_client, relay_for  # noqa: E402
from tests.support import Postgres  # noqa: E402

POLL_EVERY = 1.0
TERMINAL = {"succeeded", "failed", "canceled", "aborted"}


def relay_cpu(pid: int) -> float:
    """User + system CPU seconds of `relay serve` and its children (workers, if any)."""
    process = psutil.Process(pid)
    total = 0.0
    for each in [process, *process.children(recursive=True)]:
        times = each.cpu_times()
        total += times.user + times.system
    return total


def run_relay(postgres: Postgres, fake: FakeReplicate, items: int, concurrency: int) -> dict[str, float]:
    fake.reset()
    fake.instant = fake.retry_final = True
    dsn = postgres.new_database()
    extra = {"RELAY_LOG_LEVEL": "WARNING", "RELAY_UPSTREAM_TIMEOUT": "30"}
    with relay_for(dsn, fake, **extra) as relay, api_client(relay) as api:
        assert relay.proc is not None
        cpu_before, own_before = relay_cpu(relay.proc.pid), own_cpu()
        started = time.perf_counter()
        body = {"model": QWEN, "inputs": qwen_inputs(items), "concurrency": concurrency}
        response = api.post("/api/batches", json=body)
        assert response.status_code == 201, response.text
        batch_id = response.json()["id"]
        while True:
            batch = api.get(f"/api/batches/{batch_id}", params={"limit": 1}).json()
            if batch["status"] != "running":
                break
            time.sleep(0.25)
        elapsed = time.perf_counter() - started
        cpu, own = relay_cpu(relay.proc.pid) - cpu_before, own_cpu() - own_before
    assert batch["counts"] == {"succeeded": items}, batch["counts"]
    creates = len(fake.calls("POST", r"/models/.*/predictions"))
    polls = len(fake.calls("GET", r"/predictions/.*"))
    return {
        "items": items,
        "seconds": elapsed,
        "creates": creates / items,
        "polls": polls / items,
        "cpu_ms": cpu / items * 1000,
        "fake_ms": own / items * 1000,
        "max_unfinished": fake.max_unfinished,
    }


def own_cpu() -> float:
    """This process's CPU seconds: the fake Replicate's thread (and, for the seed, its client)."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


async def seed_approach(fake: FakeReplicate, items: int, concurrency: int) -> float:
    """Create, then GET every second until terminal; at most `concurrency` in flight."""
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=fake.api_base, headers=headers, limits=limits, timeout=30) as http:

        async def one(values: dict) -> None:
            async with gate:
                created = await http.post(f"/models/{QWEN}/predictions", json={"input": values})
                prediction = created.json()
                while prediction["status"] not in TERMINAL:
                    await asyncio.sleep(POLL_EVERY)
                    prediction = (await http.get(f"/predictions/{prediction['id']}")).json()

        started = time.perf_counter()
        await asyncio.gather(*(one(values) for values in qwen_inputs(items)))
        return time.perf_counter() - started


def run_seed(fake: FakeReplicate, items: int, concurrency: int) -> dict[str, float]:
    fake.reset()
    fake.instant = True
    own_before = own_cpu()
    elapsed = asyncio.run(seed_approach(fake, items, concurrency))
    own = own_cpu() - own_before
    return {
        "items": items,
        "seconds": elapsed,
        "creates": len(fake.calls("POST", r"/models/.*/predictions")) / items,
        "polls": len(fake.calls("GET", r"/predictions/.*")) / items,
        "cpu_ms": float("nan"),
        "fake_ms": own / items * 1000,
        "max_unfinished": fake.max_unfinished,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--seed-items", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FakeReplicate() as fake:
        postgres = Postgres(Path(tmp))
        relay = run_relay(postgres, fake, args.items, args.concurrency)
        seed = run_seed(fake, args.seed_items, args.concurrency)
    print(f"\nconcurrency {args.concurrency}, instant predictions (start + completed at once)\n")
    print(
        "| approach | items | wall s | items/s | upstream req/item (create + poll) | Relay CPU ms/item |"
        " fake (+ client) CPU ms/item |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in (("Relay batch (webhooks)", relay), ("seed: poll each second", seed)):
        cpu = "n/a" if row["cpu_ms"] != row["cpu_ms"] else f"{row['cpu_ms']:.2f}"
        requests = f"{row['creates'] + row['polls']:.2f} ({row['creates']:.2f} + {row['polls']:.2f})"
        print(
            f"| {name} | {row['items']:,} | {row['seconds']:.1f} | {row['items'] / row['seconds']:,.0f} |"
            f" {requests} | {cpu} | {row['fake_ms']:.2f} |"
        )
    ok = relay["creates"] == 1.0 and relay["polls"] == 0.0 and relay["max_unfinished"] <= args.concurrency
    verdict = "within" if ok else "OVER"
    print(f"\nceiling: 1 create and 0 polls per item, at most {args.concurrency} unfinished: {verdict}")
    print(
        f"(most unfinished at once upstream: Relay {relay['max_unfinished']}, seed {seed['max_unfinished']})"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
