"""Total webhook throughput with 1, 2 and 3 Relay instances on one Postgres (and --workers).

Usage:  .venv/bin/python bench/scale.py [--duration 8] [--connections 128]

Each setup gets a fresh database on one embedded PostgreSQL (or DATABASE_URL's server) and
`relay serve` in production mode. The load is the ingest benchmark's closed loop
(`bench/ingest.py`): distinct pre-signed deliveries replayed by `wrk`, one wrk per instance,
all started together, the connections split evenly over the instances. Throughput = 2xx answers
(each one durably committed) / the wall time of the longest wrk. Load generators, servers and
Postgres share this machine's cores, so the figures say how the setups compare here, not what
separate machines would do; the table says how many cores there were.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import presign, wrk_command, wrk_report  # noqa: E402
from service.db import database, embedded  # noqa: E402
from tests.support import RelayProcess, relay_env, with_database  # noqa: E402

SETUPS = [
    ("1 instance", 1, 1),
    ("2 instances", 2, 1),
    ("3 instances", 3, 1),
    ("1 instance, --workers 2", 1, 2),
]
WRK_THREADS = 1


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


def stored_rows(dsn: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval("SELECT count(*) FROM events")
        finally:
            await conn.close()

    return asyncio.run(count())


def run_load(ports: list[int], options: argparse.Namespace, work: Path) -> tuple[int, int, float]:
    """One wrk per instance, all at once; return 2xx answers, other answers, the longest run."""
    connections = max(1, options.connections // len(ports))
    commands = [
        wrk_command(
            port,
            presign(work / f"load-{port}", port, options.duration, WRK_THREADS),
            connections,
            options.duration,
            WRK_THREADS,
        )
        for port in ports
    ]
    loads = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands
    ]
    reports = [wrk_report(load.communicate()[0]) for load in loads]
    failed = sum(r["non2xx"] + r["socket_errors"] for r in reports)
    answered = sum(r["requests"] for r in reports) - failed
    return answered, failed, max(r["seconds"] for r in reports)


def measure(admin_dsn: str, label: str, instances: int, workers: int, options: argparse.Namespace) -> dict:
    dsn = new_database(admin_dsn, f"relay_scale_{instances}_{workers}")
    with tempfile.TemporaryDirectory() as data_dir:
        env = relay_env(dsn, RELAY_DATA_DIR=data_dir)
        args = ("--workers", str(workers)) if workers > 1 else ()
        processes = [RelayProcess(env, args=args) for _ in range(instances)]
        try:
            for process in processes:
                process.start(timeout=60)
            acknowledged, failed, seconds = run_load([p.port for p in processes], options, Path(data_dir))
        finally:
            for process in processes:
                process.stop()
    return {
        "setup": label,
        "processes": instances * workers,
        "acknowledged": acknowledged,
        "failed": failed,
        "stored": stored_rows(dsn),
        "per_second": acknowledged / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per setup")
    parser.add_argument("--connections", type=int, default=128, help="in total, split over the instances")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if os.environ.get("DATABASE_URL"):
            admin_dsn = os.environ["DATABASE_URL"]
        else:
            admin_dsn = embedded.dsn(embedded.start(Path(tmp), delete_on_exit=True))
        rows = [measure(admin_dsn, *setup, options) for setup in SETUPS]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\n{os.cpu_count()} cores, load average {load} at the end; wrk closed loop, "
        f"{options.connections} connections in total, {options.duration:g} s per setup\n"
    )
    print("| setup | Relay processes | deliveries acknowledged | not 2xx | rows stored | deliveries/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['setup']} | {row['processes']} | {row['acknowledged']:,} | {row['failed']} | "
            f"{row['stored']:,} | {row['per_second']:,.0f} |"
        )


if __name__ == "__main__":
    main()
