"""Output archive throughput, memory and its effect on ingest.

Usage:  .venv/bin/python bench/archive.py [--files 1000] [--size 200000] [--big-files 10 --big-size 20000000]

1. The ceiling: a plain httpx loop (same concurrency as the archive, 4) streaming every file
   from a local server to disk.
2. The archive: `relay serve` with RELAY_ARCHIVE=file://…; webhooks carrying the same files'
   URLs (10 per prediction); from the first webhook until every job is stored: files/s, MB/s,
   and the server's peak RSS. Again with a few large files: the peak RSS must not grow with file
   size (downloads stream to a spool file and the store, never into memory).
3. Webhook ingest: deliveries/s from 16 concurrent senders, first with the archive idle, then
   while it archives a fresh batch of files (it must stay at or above 80 % of the idle rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.core.signatures import signed_headers  # noqa: E402
from tests.fileserver import FileServer  # noqa: E402
from tests.support import WEBHOOK_KEY, Postgres, RelayProcess, query, relay_env  # noqa: E402

CONCURRENCY = 4
SENDERS = 16
PER_PREDICTION = 10


def _serve(count: int, size: int, prefix: str, origin: multiprocessing.Queue) -> None:
    server = FileServer()
    for n in range(count):
        server.add(f"/{prefix}/{n}.bin", n.to_bytes(4, "big") * (size // 4), "application/octet-stream")
    origin.put(server.origin)
    server.serve_forever()


def start_files(count: int, size: int, prefix: str) -> tuple[multiprocessing.Process, str, list[str]]:
    """A file origin in its own process (its threads must not take the GIL from the senders)."""
    found: multiprocessing.Queue = multiprocessing.Queue()
    process = multiprocessing.Process(target=_serve, args=(count, size, prefix, found), daemon=True)
    process.start()
    origin = found.get(timeout=60)
    return process, origin, [f"{origin}/{prefix}/{n}.bin" for n in range(count)]


async def ceiling(urls: list[str], target: Path) -> float:
    """Seconds for a plain httpx loop to stream every URL to a file."""
    queue = list(enumerate(urls))
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=30) as client:

        async def worker() -> None:
            while queue:
                n, url = queue.pop()
                async with client.stream("GET", url) as response:
                    with (target / f"{n}.bin").open("wb") as out:
                        async for chunk in response.aiter_raw():
                            out.write(chunk)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - started


async def send(client: httpx.AsyncClient, body: dict) -> None:
    raw = json.dumps(body).encode()
    response = await client.post(
        "/webhooks/replicate",
        content=raw,
        headers=signed_headers(WEBHOOK_KEY, "msg_" + uuid.uuid4().hex, raw),
    )
    response.raise_for_status()


async def post_outputs(base: str, urls: list[str]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for start in range(0, len(urls), PER_PREDICTION):
            body = {
                "id": "p" + uuid.uuid4().hex[:20],
                "status": "succeeded",
                "output": urls[start : start + PER_PREDICTION],
            }
            await send(client, body)


async def ingest_rate(base: str, deliveries: int) -> float:
    """Deliveries per second, SENDERS at a time (bodies without output URLs)."""
    remaining = [deliveries]
    async with httpx.AsyncClient(
        base_url=base, timeout=30, limits=httpx.Limits(max_connections=SENDERS)
    ) as client:

        async def sender() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                body = {
                    "id": "q" + uuid.uuid4().hex[:20],
                    "status": "processing",
                    "logs": "x" * 200,
                    "output": None,
                }
                await send(client, body)

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(SENDERS)))
        return deliveries / (time.perf_counter() - started)


def stored(dsn: str) -> int:
    return query(dsn, "SELECT count(*) AS n FROM archive_jobs WHERE status = 'stored'")[0]["n"]


def archive_run(relay: RelayProcess, dsn: str, urls: list[str]) -> tuple[float, int]:
    """Seconds from the first webhook until every URL is stored, and the server's peak RSS."""
    process = psutil.Process(relay.proc.pid)  # type: ignore[union-attr]
    before = stored(dsn)
    peak = process.memory_info().rss
    started = time.perf_counter()
    asyncio.run(post_outputs(relay.url, urls))
    while stored(dsn) < before + len(urls):
        peak = max(peak, process.memory_info().rss)
        time.sleep(0.05)
    return time.perf_counter() - started, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--big-files", type=int, default=10)
    parser.add_argument("--big-size", type=int, default=20_000_000)
    parser.add_argument("--deliveries", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, small, small_urls = start_files(args.files, args.size, "small")
        ceiling_dir = root / "ceiling"
        ceiling_dir.mkdir()
        ceiling_seconds = asyncio.run(ceiling(small_urls, ceiling_dir))

        postgres = Postgres(root / "pg")
        dsn = postgres.new_database()
        _, big, big_urls = start_files(args.big_files, args.big_size, "big")
        _, later, later_urls = start_files(args.files, args.size, "later")
        hosts = " ".join((small, big, later))
        env = relay_env(dsn, RELAY_ARCHIVE=(root / "files").as_uri(), RELAY_ARCHIVE_HOSTS=hosts,
                        RELAY_DATA_DIR=str(root), RELAY_ARCHIVE_MAX_BYTES=str(args.big_size * 2))  # fmt: skip
        with RelayProcess(env) as relay:
            idle_rss = psutil.Process(relay.proc.pid).memory_info().rss  # type: ignore[union-attr]
            archive_seconds, small_peak = archive_run(relay, dsn, small_urls)
            _, big_peak = archive_run(relay, dsn, big_urls)
            idle_rate = asyncio.run(ingest_rate(relay.url, args.deliveries))
            asyncio.run(post_outputs(relay.url, later_urls))
            busy_rate = asyncio.run(ingest_rate(relay.url, args.deliveries))
            still_archiving = stored(dsn) < 2 * args.files + args.big_files
        mb = args.files * args.size / 1e6
        print(
            f"\n{args.files} files of {args.size / 1000:.0f} kB ({mb:.0f} MB), concurrency {CONCURRENCY}:\n"
        )
        print("| run | seconds | files/s | MB/s | peak RSS |")
        print("| --- | ---: | ---: | ---: | ---: |")
        print(f"| plain httpx loop to disk (ceiling) | {ceiling_seconds:.1f} | {args.files / ceiling_seconds:.0f} "
              f"| {mb / ceiling_seconds:.1f} | |")  # fmt: skip
        print(f"| relay archive, file store | {archive_seconds:.1f} | {args.files / archive_seconds:.0f} "
              f"| {mb / archive_seconds:.1f} | {small_peak / 2**20:.0f} MiB |")  # fmt: skip
        print(f"| relay archive, {args.big_files} files of {args.big_size / 1e6:.0f} MB | | | "
              f"| {big_peak / 2**20:.0f} MiB |")  # fmt: skip
        print(
            f"\nserver RSS idle {idle_rss / 2**20:.0f} MiB; archive / ceiling = {ceiling_seconds / archive_seconds:.2f}"
        )
        share = busy_rate / idle_rate
        print(f"\n| webhook ingest | deliveries/s |\n| --- | ---: |\n| archive idle | {idle_rate:.0f} |")
        print(f"| while archiving {args.files} files{'' if still_archiving else ' (finished during the run)'} "
              f"| {busy_rate:.0f} ({share:.0%}) |")  # fmt: skip
        verdict = "ok" if share >= 0.8 else "BELOW the 80 % floor"
        print(f"\ningest while archiving: {share:.0%} of idle ({verdict})")


if __name__ == "__main__":
    main()
