"""Where encryption at rest spends: sealing/opening one body in-process, and `store.append`.

    .venv/bin/python bench/encryption.py [--rounds R]

Starts a throwaway embedded Postgres and, per round, appends the same deliveries without and with
a key (fresh database each), and prints the tables. The cost seen over HTTP, plain versus
encrypted `relay serve`, is measured by `bench/ingest.py --encryption`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from service.core import crypto
from service.db import store
from service.db.vault import Vault
from service.ingest.committer import delivery_from
from service.ops.simulate import lifecycle
from tests.support import Postgres

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()

    print("| in-process operation | µs |\n| --- | ---: |")
    for name, micros in crypto_costs():
        print(f"| {name} | {micros:.1f} |")

    with tempfile.TemporaryDirectory() as tmp:
        postgres = Postgres(Path(tmp))
        appends: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(options.rounds):
            for encrypted in (False, True):
                vault = Vault([base64.b64decode(KEY)] if encrypted else [])
                appends[encrypted].append(asyncio.run(append_rate(postgres.new_database(), vault, 50)))
    print("\n| store.append, 50 batches of 120 deliveries | deliveries/s, each round | median |")
    print("| --- | --- | ---: |")
    for encrypted, label in ((False, "plain"), (True, "encrypted")):
        each = ", ".join(f"{r:.0f}" for r in appends[encrypted])
        print(f"| {label} | {each} | {statistics.median(appends[encrypted]):.0f} |")


if __name__ == "__main__":
    main()
