"""What encryption at rest costs: sealing/opening one body in-process, and ingest end to end.

    .venv/bin/python bench/encryption.py [--predictions N] [--concurrency C] [--rounds R]

Starts a throwaway embedded Postgres and, per round, one `relay serve` without and one with
RELAY_ENCRYPTION_KEY (fresh database each), drives each with `relay simulate`, and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402

from service import crypto, store  # noqa: E402
from service.ingest import delivery_from  # noqa: E402
from service.simulate import lifecycle  # noqa: E402
from service.vault import Vault  # noqa: E402
from tests.support import ROOT, WEBHOOK_SECRET, Postgres, RelayProcess, relay_env  # noqa: E402

KEY = base64.b64encode(os.urandom(32)).decode()


def crypto_costs(repeat: int = 20_000) -> list[tuple[str, float]]:
    body = json.dumps(lifecycle("p" * 26)[-1]).encode()
    kek, data_key = os.urandom(32), crypto.new_data_key()
    sealed = crypto.seal(data_key, body, "p1", "msg_1")
    wrapped = crypto.wrap(kek, data_key, "p1")
    cases = {
        f"seal one {len(body)}-byte body": lambda: crypto.seal(data_key, body, "p1", "msg_1"),
        "open one body": lambda: crypto.open_sealed(data_key, sealed, "p1", "msg_1"),
        "wrap a new data key": lambda: crypto.wrap(kek, crypto.new_data_key(), "p1"),
        "unwrap a data key (cache miss)": lambda: crypto.unwrap(kek, wrapped, "p1"),
    }
    results = []
    for name, call in cases.items():
        started = time.perf_counter()
        for _ in range(repeat):
            call()
        results.append((name, (time.perf_counter() - started) / repeat * 1e6))
    return results


async def append_rate(dsn: str, vault: Vault, batches: int, batch_size: int = 120) -> float:
    """Deliveries per second through `store.append` alone: the database cost, without HTTP."""
    deliveries = []
    for n in range(batches * batch_size // 6):
        for i, body in enumerate(lifecycle(f"bench{n:021d}")):
            raw = json.dumps(body).encode()
            deliveries.append(delivery_from(body, raw, webhook_id=f"msg_{n}_{i}", source="webhook"))
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        for start in range(0, len(deliveries), batch_size):
            async with conn.transaction():
                await store.append(conn, deliveries[start : start + batch_size], vault.seal)
        return len(deliveries) / (time.perf_counter() - started)
    finally:
        await conn.close()


def ingest_rate(postgres: Postgres, encrypted: bool, options: argparse.Namespace) -> float:
    extra = {"RELAY_ENCRYPTION_KEY": KEY} if encrypted else {}
    env = relay_env(postgres.new_database(), **extra)
    with RelayProcess(env) as relay:
        command = [sys.executable, "-m", "service", "simulate", "--url", f"{relay.url}/webhooks/replicate"]
        command += ["--predictions", str(options.predictions), "--concurrency", str(options.concurrency)]
        command += ["--secret", WEBHOOK_SECRET, "--seed", "1"]
        started = time.perf_counter()
        result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        elapsed = time.perf_counter() - started
    acknowledged = int(result.stdout.split("acknowledged ")[1].split(",")[0])
    return acknowledged / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()

    print("| in-process operation | µs |\n| --- | ---: |")
    for name, micros in crypto_costs():
        print(f"| {name} | {micros:.1f} |")

    with tempfile.TemporaryDirectory() as tmp:
        postgres = Postgres(Path(tmp))
        rates: dict[bool, list[float]] = {False: [], True: []}
        appends: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(options.rounds):
            for encrypted in (False, True):
                vault = Vault([base64.b64decode(KEY)] if encrypted else [])
                appends[encrypted].append(asyncio.run(append_rate(postgres.new_database(), vault, 50)))
                rates[encrypted].append(ingest_rate(postgres, encrypted, options))
    print("\n| store.append, 50 batches of 120 deliveries | deliveries/s, each round | median |")
    print("| --- | --- | ---: |")
    for encrypted, label in ((False, "plain"), (True, "encrypted")):
        each = ", ".join(f"{r:.0f}" for r in appends[encrypted])
        print(f"| {label} | {each} | {statistics.median(appends[encrypted]):.0f} |")
    print(
        f"\n| ingest ({options.predictions} predictions × 6 deliveries, concurrency {options.concurrency}) "
        "| deliveries/s, each round | median |\n| --- | --- | ---: |"
    )
    for encrypted, label in ((False, "plain"), (True, "encrypted")):
        each = ", ".join(f"{r:.0f}" for r in rates[encrypted])
        print(f"| {label} | {each} | {statistics.median(rates[encrypted]):.0f} |")


if __name__ == "__main__":
    main()
