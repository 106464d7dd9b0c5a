"""Total webhook throughput with 1, 2 and 3 Relay instances on one Postgres (and --workers).

Usage:  .venv/bin/python bench/scale.py [--predictions 150] [--clients 3] [--concurrency 16]

Each setup gets a fresh database on one embedded PostgreSQL (or DATABASE_URL's server). The load
is always the same: `--clients` `relay simulate` processes (real signed lifecycles, six
deliveries per prediction), assigned to the instances round-robin, all started together.
Throughput = deliveries acknowledged (durably committed) / wall time from the first client's
start to the last client's end. Client, servers and Postgres share this machine's cores, so the
figures are a floor for what separate machines would do; the table says how many cores there were.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service import database, embedded  # noqa: E402
from tests.support import RelayProcess, relay_env, with_database  # noqa: E402

SETUPS = [
    ("1 instance", 1, 1),
    ("2 instances", 2, 1),
    ("3 instances", 3, 1),
    ("1 instance, --workers 3", 1, 3),
]
DELIVERIES_PER_PREDICTION = 6


def new_database(admin_dsn: str, name: str) -> str:
    async def create() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    dsn = with_database(admin_dsn, name)
    asyncio.run(database.migrate(dsn))
    return dsn


def run_clients(urls: list[str], options: argparse.Namespace, env: dict[str, str]) -> tuple[int, float]:
    """Start every client at once; return deliveries acknowledged and the wall time."""
    started = time.perf_counter()
    clients = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "simulate",
                "--url",
                f"{urls[i % len(urls)]}/webhooks/replicate",
                "--predictions",
                str(options.predictions),
                "--concurrency",
                str(options.concurrency),
                "--seed",
                str(i),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(options.clients)
    ]
    outputs = [client.communicate()[0] for client in clients]
    elapsed = time.perf_counter() - started
    acknowledged = 0
    for output in outputs:
        match = re.search(r"acknowledged (\d+)", output)
        if match is None:
            raise SystemExit(f"a client failed:\n{output}")
        acknowledged += int(match.group(1))
    return acknowledged, elapsed


def measure(admin_dsn: str, label: str, instances: int, workers: int, options: argparse.Namespace) -> dict:
    dsn = new_database(admin_dsn, f"relay_scale_{instances}_{workers}")
    with tempfile.TemporaryDirectory() as data_dir:
        env = relay_env(dsn, RELAY_DATA_DIR=data_dir)
        args = ("--workers", str(workers)) if workers > 1 else ()
        processes = [RelayProcess(env, args=args) for _ in range(instances)]
        try:
            for process in processes:
                process.start(timeout=60)
            acknowledged, elapsed = run_clients([p.url for p in processes], options, env)
        finally:
            for process in processes:
                process.stop()
    expected = options.clients * options.predictions * DELIVERIES_PER_PREDICTION
    return {
        "setup": label,
        "processes": instances * workers,
        "deliveries": acknowledged,
        "expected": expected,
        "seconds": elapsed,
        "per_second": acknowledged / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=int, default=150, help="per client")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16, help="per client")
    parser.add_argument("--repeat", type=int, default=1, help="runs per setup; the best is shown")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if os.environ.get("DATABASE_URL"):
            admin_dsn = os.environ["DATABASE_URL"]
        else:
            admin_dsn = embedded.dsn(embedded.start(Path(tmp), delete_on_exit=True))
        rows = []
        for setup in SETUPS:
            runs = [measure(admin_dsn, *setup, options) for _ in range(options.repeat)]
            rows.append(max(runs, key=lambda run: run["per_second"]))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\n{os.cpu_count()} cores, load average {load}; {options.clients} clients x "
        f"{options.predictions} predictions x {DELIVERIES_PER_PREDICTION} deliveries, "
        f"concurrency {options.concurrency} each\n"
    )
    print("| setup | Relay processes | deliveries acked | seconds | deliveries/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        short = "" if row["deliveries"] == row["expected"] else f" (of {row['expected']})"
        print(
            f"| {row['setup']} | {row['processes']} | {row['deliveries']}{short} | "
            f"{row['seconds']:.2f} | {row['per_second']:.0f} |"
        )


if __name__ == "__main__":
    main()
