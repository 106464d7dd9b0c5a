"""Output archive throughput, memory and its effect on ingest.

Usage:  .venv/bin/python bench/archive.py [--files 1000] [--size 200000] [--big-sizes 2e6,20e6,80e6]

1. The ceiling: a plain httpx loop (same concurrency as the archive, 4) streaming every file
   from a local server to disk.
2. The archive: `relay serve` with RELAY_ARCHIVE=file://…; webhooks carrying the same files'
   URLs (10 per prediction); from the first webhook until every job is stored: files/s, MB/s,
   and the server's peak RSS. Again with files of 2, 20 and 80 MB: the peak RSS must not grow
   with file size (downloads stream to a spool file and the store, never into memory).
3. Webhook ingest: deliveries/s from 16 raw keep-alive connections replaying pre-signed
   deliveries from a process of their own (so Relay, not the sender, is the limit), first with
   the archive idle, then while it archives a fresh batch of files (target: at or above 80 % of
   the idle rate).
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

from bench.deliveries import bodies, raw_request  # noqa: E402
from bench.destinations import generate  # noqa: E402
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


def ingest_rate(relay: RelayProcess, seconds: float) -> float:
    """Deliveries per second over `seconds`: SENDERS raw keep-alive connections replaying
    pre-signed deliveries (bodies without output URLs) from a process of their own
    (bench/destinations.py's generator), so the sender is not the limit: Relay is."""
    requests = [raw_request(WEBHOOK_KEY, relay.port, body, int(time.time())) for body in bodies(40_000)]
    out: multiprocessing.Queue[float] = multiprocessing.Queue()
    process = multiprocessing.Process(target=generate, args=(relay.port, requests, seconds, SENDERS, out))
    process.start()
    rate = out.get()
    process.join()
    return float(rate)


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


def report(args: argparse.Namespace, ceiling_seconds: float, runs: dict[str, float]) -> None:
    mb = args.files * args.size / 1e6
    print(f"\n{args.files} files of {args.size / 1000:.0f} kB ({mb:.0f} MB), concurrency {CONCURRENCY}:\n")
    print("| run | seconds | files/s | MB/s | peak RSS of relay serve |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rate = f"{args.files / ceiling_seconds:.0f} | {mb / ceiling_seconds:.1f}"
    print(f"| plain httpx loop to disk (ceiling) | {ceiling_seconds:.1f} | {rate} | |")
    seconds = runs["archive_seconds"]
    rate = f"{args.files / seconds:.0f} | {mb / seconds:.1f}"
    print(f"| relay archive, file store | {seconds:.1f} | {rate} | {runs['small_peak'] / 2**20:.0f} MiB |")
    for size in args.big_sizes:
        big = f"{args.big_files} files of {size / 1e6:.0f} MB"
        print(f"| relay archive, {big} | | | | {runs[f'peak_{size}'] / 2**20:.0f} MiB |")
    print(f"\nrelay serve RSS before archiving: {runs['idle_rss'] / 2**20:.0f} MiB; "
          f"archive rate / ceiling rate = {ceiling_seconds / seconds:.2f}")  # fmt: skip
    share = runs["busy_rate"] / runs["idle_rate"]
    during = "while archiving" if runs["still_archiving"] else "while archiving (it finished during the run)"
    print(f"\n| webhook ingest, {SENDERS} connections, {args.seconds:.0f} s | deliveries/s |\n| --- | ---: |")
    print(f"| archive idle | {runs['idle_rate']:.0f} |\n| {during} | {runs['busy_rate']:.0f} ({share:.0%}) |")
    verdict = "ok" if share >= 0.8 else "BELOW the 80 % floor"
    print(f"\ningest while archiving: {share:.0%} of idle ({verdict})")


def measure(
    args: argparse.Namespace, root: Path, origins: dict[str, tuple[str, list[str]]]
) -> dict[str, float]:
    postgres = Postgres(root / "pg")
    dsn = postgres.new_database()
    places = {"RELAY_ARCHIVE": (root / "files").as_uri(), "RELAY_DATA_DIR": str(root)}
    hosts = " ".join(origin for origin, _ in origins.values())
    cap = str(2 * max(args.big_sizes))
    env = relay_env(dsn, RELAY_ARCHIVE_HOSTS=hosts, RELAY_ARCHIVE_MAX_BYTES=cap, **places)
    runs: dict[str, float] = {}
    with RelayProcess(env) as relay:
        runs["idle_rss"] = psutil.Process(relay.proc.pid).memory_info().rss  # type: ignore[union-attr]
        runs["archive_seconds"], runs["small_peak"] = archive_run(relay, dsn, origins["small"][1])
        for size in args.big_sizes:
            runs[f"peak_{size}"] = archive_run(relay, dsn, origins[f"big_{size}"][1])[1]
        runs["idle_rate"] = ingest_rate(relay, args.seconds)
        asyncio.run(post_outputs(relay.url, origins["later"][1]))
        runs["busy_rate"] = ingest_rate(relay, args.seconds)
        runs["still_archiving"] = stored(dsn) < 2 * args.files + args.big_files * len(args.big_sizes)
    return runs


def sizes(text: str) -> list[int]:
    return [int(float(size)) for size in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--big-files", type=int, default=8, help="files of each large size")
    parser.add_argument(
        "--big-sizes", type=sizes, default=[2_000_000, 20_000_000, 80_000_000], help="large file sizes, bytes"
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each ingest measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        origins = {
            "small": start_files(args.files, args.size, "small")[1:],
            **{f"big_{size}": start_files(args.big_files, size, f"big{size}")[1:] for size in args.big_sizes},
            "later": start_files(args.files, args.size, "later")[1:],
        }
        (root / "ceiling").mkdir()
        ceiling_seconds = asyncio.run(ceiling(origins["small"][1], root / "ceiling"))
        report(args, ceiling_seconds, measure(args, root, origins))


if __name__ == "__main__":
    main()
