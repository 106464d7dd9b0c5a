"""Ingest benchmark: bare Starlette ceiling vs a naive peer vs Relay, side by side in one run.

    .venv/bin/python bench/ingest.py            (needs wrk: apt-get install -y wrk)

Starts a throwaway embedded PostgreSQL in a temp dir, measures its own INSERT ceiling, then for
each server (started as its own process on uvicorn with uvloop/httptools):
- closed loop: `wrk` with many connections replaying distinct pre-signed deliveries -> max req/s;
- open loop: `openloop.py` at fixed offered rates -> latency from when each request was due;
- CPU of the server, of Postgres and of the load generator, and the server's peak RSS.
Relay is the real `relay serve` in production mode (DATABASE_URL and secrets set), with
WebSocket subscribers following the all-events stream throughout; "relay (encrypted)" is the same
run with RELAY_ENCRYPTION_KEY set, right after it (`--encryption` runs just those two).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench import pgceiling  # noqa: E402
from bench.deliveries import write_requests  # noqa: E402
from service.db import embedded  # noqa: E402
from tests.support import ADMIN_TOKEN, free_port, relay_env, with_database  # noqa: E402
from tests.support import WEBHOOK_KEY as KEY  # noqa: E402
from tests.support import WEBHOOK_SECRET as SECRET  # noqa: E402

RATES = (1000, 2000, 5000)
WRK_THREADS = 2
WARMUP_SECONDS = 2.0
PRESIGNED_PER_SECOND = 20_000  # closed-loop requests signed per second of run; beyond, wrk wraps
ENCRYPTION_KEY = base64.b64encode(os.urandom(32)).decode()


@dataclass
class Phase:
    """One load run against one server."""

    requests: int
    seconds: float
    non2xx: int
    p50: float
    p99: float
    p999: float
    server_cpu: float
    postgres_cpu: float
    generator_cpu: float
    offered: int | None = None
    wrapped: bool = False

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


@dataclass
class Result:
    name: str
    closed: Phase | None = None
    open: list[Phase] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    stored: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class CpuMeter:
    """CPU seconds used by a set of processes between start() and stop()."""

    def __init__(self, processes: callable):  # type: ignore[valid-type]
        self._processes = processes
        self._start: dict[int, float] = {}

    @staticmethod
    def _snapshot(processes: list[psutil.Process]) -> dict[int, float]:
        times = {}
        for process in processes:
            with contextlib.suppress(psutil.Error):
                cpu = process.cpu_times()
                times[process.pid] = cpu.user + cpu.system
        return times

    def start(self) -> None:
        self._start = self._snapshot(self._processes())

    def stop(self) -> float:
        end = self._snapshot(self._processes())
        return sum(t - self._start.get(pid, 0.0) for pid, t in end.items())


def postgres_processes(server) -> list[psutil.Process]:
    postmaster = psutil.Process(int((Path(server.pgdata) / "postmaster.pid").read_text().split()[0]))
    return [postmaster, *postmaster.children()]


def run_with_cpu(command: list[str]) -> tuple[str, float]:
    """Run a load generator; return its stdout and the CPU seconds it used (from wait4)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{output}")
    return output, usage.ru_utime + usage.ru_stime


def presign(prefix: Path, port: int, duration: float, threads: int = WRK_THREADS) -> Path:
    """Pre-signed deliveries for a closed loop: one file per wrk thread (`replay.lua`)."""
    per_thread = int(PRESIGNED_PER_SECOND * duration / threads)
    for thread in range(threads):
        write_requests(Path(f"{prefix}.{thread}"), KEY, port, per_thread)
    return prefix


def wrk_command(
    port: int, prefix: Path, connections: int, duration: float, threads: int = WRK_THREADS
) -> list[str]:
    """wrk replaying the pre-signed deliveries under `prefix` (see `presign`) to one server."""
    return [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{int(duration)}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "replay.lua"),
        f"http://127.0.0.1:{port}/webhooks/replicate",
        "--",
        str(prefix),
    ]


def wrk_report(output: str) -> dict:
    """The JSON line `replay.lua` prints when wrk is done."""
    return json.loads(output.split("WRK_JSON ", 1)[1].splitlines()[0])


class Server:
    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        port: int,
        stored: tuple[str, str] | None = None,
        relay: bool = False,
        subscribers: int = 0,
        kind: str | None = None,
    ):
        self.name, self.command, self.env, self.port = name, command, env, port
        self.kind = kind or name  # what --only selects
        self.stored, self.relay, self.subscribers = stored, relay, subscribers
        self.process: subprocess.Popen | None = None

    def processes(self) -> list[psutil.Process]:
        """The server and its worker processes, if any."""
        assert self.process is not None
        parent = psutil.Process(self.process.pid)
        return [parent, *parent.children(recursive=True)]

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(self.command, env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1)
                return self
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not start listening")

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def peak_rss_mb(self) -> float:
        """Peak resident memory (VmHWM), summed over the server's processes."""
        total = 0
        for process in self.processes():
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        return total / 1024


def top_frames(folded: Path, count: int = 25) -> str:
    """The functions holding the most samples, inclusive, from py-spy's folded stacks."""
    totals: dict[str, int] = {}
    samples = 0
    for line in folded.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        samples += int(number)
        for frame in set(stack.split(";")):
            totals[frame] = totals.get(frame, 0) + int(number)
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:count]
    return "\n".join(f"{n * 100 / samples:5.1f}%  {frame}" for frame, n in ranked)


class Bench:
    def __init__(self, options: argparse.Namespace, work: Path, postgres) -> None:
        self.options = options
        self.work = work
        self.postgres = postgres

    def meters(self, server: Server) -> tuple[CpuMeter, CpuMeter]:
        return CpuMeter(server.processes), CpuMeter(lambda: postgres_processes(self.postgres))

    @contextlib.contextmanager
    def profiler(self, server: Server) -> Iterator[None]:
        """With --profile DIR: py-spy samples the server during the closed loop (a flame graph)."""
        if not self.options.profile or server.name not in self.options.profile_servers:
            yield
            return
        assert server.process is not None
        out = Path(self.options.profile) / f"{server.name}.folded"
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        command = [
            spy,
            "record",
            "--nonblocking",
            "--rate",
            "400",
            "--format",
            "raw",
            "--pid",
            str(server.process.pid),
        ]
        spy = subprocess.Popen(
            [*command, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
            print(f"profile of {server.name} (folded stacks): {out}", file=sys.stderr)
            print(top_frames(out), file=sys.stderr)

    def closed_loop(self, server: Server) -> Phase:
        duration = self.options.duration
        prefix = presign(self.work / f"{server.name}-closed", server.port, duration)
        server_cpu, postgres_cpu = self.meters(server)
        server_cpu.start(), postgres_cpu.start()
        with self.profiler(server):
            output, generator_cpu = run_with_cpu(
                wrk_command(server.port, prefix, self.options.connections, duration)
            )
        used, pg_used = server_cpu.stop(), postgres_cpu.stop()
        report = wrk_report(output)
        return Phase(
            requests=report["requests"],
            seconds=report["seconds"],
            non2xx=report["non2xx"] + report["socket_errors"],
            p50=report["p50"],
            p99=report["p99"],
            p999=report["p999"],
            server_cpu=used,
            postgres_cpu=pg_used,
            generator_cpu=generator_cpu,
            wrapped=bool(report["wrapped"]),
        )

    def open_loop(self, server: Server, rate: int, seconds: float) -> Phase:
        path = write_requests(self.work / f"{server.name}-open-{rate}", KEY, server.port, int(rate * seconds))
        server_cpu, postgres_cpu = self.meters(server)
        server_cpu.start(), postgres_cpu.start()
        output, _ = run_with_cpu(
            [
                sys.executable,
                str(BENCH / "openloop.py"),
                str(path),
                "--port",
                str(server.port),
                "--rate",
                str(rate),
                "--duration",
                str(seconds),
            ]
        )
        used, pg_used = server_cpu.stop(), postgres_cpu.stop()
        report = json.loads(output.splitlines()[-1])
        return Phase(
            requests=report["completed"],
            seconds=report["seconds"],
            non2xx=report["non2xx"] + report["sent"] - report["completed"],
            p50=report["p50"],
            p99=report["p99"],
            p999=report["p999"],
            server_cpu=used,
            postgres_cpu=pg_used,
            generator_cpu=report["cpu_seconds"],
            offered=rate,
        )

    def measure(self, server: Server) -> Result:
        result = Result(server.name)
        started = time.monotonic()
        self.open_loop(server, 1000, WARMUP_SECONDS)
        # Open loop first: after the closed loop's 100,000+ rows, autovacuum and the checkpoint
        # they cause compete for the same two cores, and the latencies measured the Postgres
        # housekeeping (p99 at 1,000/s went from ~3 to ~60 ms in one run) more than the server.
        for rate in self.options.rates:
            result.open.append(self.open_loop(server, rate, self.options.duration))
        result.closed = self.closed_loop(server)
        result.peak_rss_mb = server.peak_rss_mb()
        result.seconds = time.monotonic() - started
        return result


async def _sql(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def settle(dsn: str) -> None:
    """Do now the housekeeping a server's rows leave behind, so the next server does not pay it."""
    asyncio.run(_sql(dsn, "VACUUM (ANALYZE)"))
    asyncio.run(_sql(dsn, "CHECKPOINT"))


def new_database(admin_dsn: str, name: str) -> str:
    asyncio.run(_sql(admin_dsn, f'CREATE DATABASE "{name}"'))
    return with_database(admin_dsn, name)


def python() -> str:
    return sys.executable


def relay_has_workers_flag() -> bool:
    """`relay serve --workers` comes from the deploy branch; measure it only where it exists."""
    usage = subprocess.run(
        [python(), "-m", "service", "serve", "--help"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    return "--workers" in usage


def servers(admin_dsn: str, relay_workers: list[int], subscriber_counts: list[int]) -> Iterator[Server]:
    port = free_port()
    command = [python(), str(BENCH / "peers.py"), "ceiling", "--port", str(port)]
    yield Server("ceiling", command, dict(os.environ), port)
    dsn, port = new_database(admin_dsn, "naive"), free_port()
    command = [python(), str(BENCH / "peers.py"), "naive", "--port", str(port)]
    command += ["--dsn", dsn, "--secret", SECRET]
    yield Server("naive", command, dict(os.environ), port, stored=(dsn, "SELECT count(*) FROM webhooks"))
    # Every subscriber count with one worker; more workers only with the first count (run time).
    runs = [(workers, count) for workers in relay_workers for count in subscriber_counts]
    for workers, count in [(w, c) for w, c in runs if w == 1 or c == subscriber_counts[0]]:
        name = "relay"
        if workers > 1:
            name += f" ({workers} workers)"
        if count != subscriber_counts[0]:
            name += f", {count or 'no'} subscribers"
        yield relay_server(admin_dsn, name, f"relay_{workers}_{count}", workers, count)
        if workers == 1 and count == subscriber_counts[0]:  # its encrypted twin, right after it
            yield relay_server(admin_dsn, "relay (encrypted)", "relay_encrypted", 1, count, encrypted=True)


def relay_server(
    admin_dsn: str, name: str, database: str, workers: int, count: int, encrypted: bool = False
) -> Server:
    dsn, port = new_database(admin_dsn, database), free_port()
    # Production mode: DATABASE_URL and every secret set.
    env = relay_env(dsn, RELAY_ENCRYPTION_KEY=ENCRYPTION_KEY) if encrypted else relay_env(dsn)
    command = [python(), "-m", "service", "serve", "--port", str(port)]
    if workers > 1:
        command += ["--workers", str(workers)]
    # Counting only encrypted rows shows that every stored body was sealed.
    stored = (dsn, f"SELECT count(*) FROM events{' WHERE encrypted' if encrypted else ''}")
    kind = "encrypted" if encrypted else "relay"
    return Server(name, command, env, port, stored=stored, relay=True, subscribers=count, kind=kind)


@contextlib.contextmanager
def subscribers(port: int, count: int) -> Iterator[dict]:
    process = subprocess.Popen(
        [
            python(),
            str(BENCH / "subscribers.py"),
            "--port",
            str(port),
            "--token",
            ADMIN_TOKEN,
            "--count",
            str(count),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    report: dict = {}
    try:
        yield report
    finally:
        process.terminate()
        report.update(json.loads(process.stdout.readline()))
        process.wait()


def ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def print_tables(results: list[Result], ceiling: dict[str, float], options: argparse.Namespace) -> None:
    base = next((r.closed.rate for r in results if r.name == "ceiling" and r.closed), None)
    print(
        f"\nMax sustained throughput (closed loop: wrk -t{WRK_THREADS} -c{options.connections}, "
        f"{options.duration:g}s, distinct pre-signed deliveries); "
        "CPU in cores (1.0 = one core busy); per server core = req/s ÷ server CPU, what the "
        "server would do with a core to itself, its other costs unchanged\n"
    )
    print(
        "| server | req/s | × ceiling | non-2xx | p50 ms | p99 ms | server CPU | CPU µs/req "
        "| req/s per server core | Postgres CPU | wrk CPU | peak RSS MB | rows stored |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in results:
        c = r.closed
        assert c is not None
        ratio = f"{c.rate / base:.2f}" if base else "-"
        wrapped = " (wrapped)" if c.wrapped else ""
        print(
            f"| {r.name} | {c.rate:,.0f}{wrapped} | {ratio} | {c.non2xx} | {ms(c.p50)} | {ms(c.p99)} "
            f"| {c.server_cpu / c.seconds:.2f} | {c.server_cpu / c.requests * 1e6:.0f} "
            f"| {c.requests / c.server_cpu:,.0f} | {c.postgres_cpu / c.seconds:.2f} "
            f"| {c.generator_cpu / c.seconds:.2f} "
            f"| {r.peak_rss_mb:.0f} | {'-' if r.stored is None else f'{r.stored:,}'} |"
        )
    print(
        f"\nLatency at fixed offered rates (open loop, {options.duration:g}s each, "
        "latency from when each request was due; failed = not 2xx, or unanswered 5 s after the last send)\n"
    )
    print(
        "| server | offered/s | achieved/s | p50 ms | p99 ms | p99.9 ms | failed | server CPU "
        "| Postgres CPU | generator CPU |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in results:
        for o in r.open:
            print(
                f"| {r.name} | {o.offered:,} | {o.rate:,.0f} | {ms(o.p50)} | {ms(o.p99)} | {ms(o.p999)} "
                f"| {o.non2xx} | {o.server_cpu / o.seconds:.2f} | {o.postgres_cpu / o.seconds:.2f} "
                f"| {o.generator_cpu / o.seconds:.2f} |"
            )
    by_name = {r.name: r for r in results}
    print("\nRatios (same run)\n")
    if ceiling:
        print(
            "- Postgres alone: single-row autocommit INSERTs (32 connections) "
            f"{ceiling['single']:,.0f} rows/s; "
            f"100-row batched INSERTs (4 connections) {ceiling['batched']:,.0f} rows/s; "
            f"one commit at a time p50 / p99 / p99.9 {ceiling['commit_p50']:.1f} / "
            f"{ceiling['commit_p99']:.1f} / {ceiling['commit_p999']:.1f} ms"
        )
    naive = by_name.get("naive")
    naive_p99 = {o.offered: o.p99 for o in naive.open} if naive else {}
    for relay in (r for r in results if r.name.startswith("relay") and r.closed):
        rate = relay.closed.rate  # type: ignore[union-attr]
        if ceiling:
            print(f"- {relay.name} / single-row INSERT ceiling: {rate / ceiling['single']:.2f}×")
        if naive and naive.closed:
            print(f"- {relay.name} / naive peer: {rate / naive.closed.rate:.2f}×")
        if base:
            print(f"- {relay.name} / bare Starlette: {rate / base:.2f}×")
        for o in relay.open:
            if o.offered in naive_p99:
                print(
                    f"- {relay.name} p99 at {o.offered:,}/s: {ms(o.p99)} ms "
                    f"(naive: {ms(naive_p99[o.offered])} ms)"
                )
    print_encryption_cost(by_name.get("relay"), by_name.get("relay (encrypted)"))
    for r in results:
        for note in r.notes:
            print(f"- {r.name}: {note}")


def print_encryption_cost(plain: Result | None, sealed: Result | None) -> None:
    if not (plain and sealed and plain.closed and sealed.closed):
        return
    p, e = plain.closed, sealed.closed
    print(
        f"- relay (encrypted) / relay: {e.rate / p.rate:.2f}× req/s ({e.rate:,.0f} vs {p.rate:,.0f}), "
        f"closed-loop p99 {ms(e.p99)} vs {ms(p.p99)} ms, server CPU "
        f"{e.server_cpu / e.requests * 1e6:.0f} vs {p.server_cpu / p.requests * 1e6:.0f} µs/req"
    )
    for po, eo in zip(plain.open, sealed.open, strict=False):
        print(f"- relay (encrypted) p99 at {eo.offered:,}/s: {ms(eo.p99)} ms (plain: {ms(po.p99)} ms)")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        cpu,
    )
    memory = psutil.virtual_memory().total / 2**30
    system = f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    return f"{os.cpu_count()} CPUs ({model}), {memory:.0f} GiB RAM, {system}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load phase")
    parser.add_argument("--connections", type=int, default=128, help="wrk connections (closed loop)")
    parser.add_argument("--rates", type=lambda s: [int(r) for r in s.split(",")], default=list(RATES))
    parser.add_argument(
        "--only",
        action="append",
        choices=["ceiling", "naive", "relay", "encrypted"],
        help="repeatable; relay = the plain Relay runs, encrypted = relay (encrypted)",
    )
    parser.add_argument(
        "--encryption",
        action="store_true",
        help="just relay and relay (encrypted), back to back, with the first --subscribers count",
    )
    parser.add_argument(
        "--relay-workers",
        type=lambda s: [int(w) for w in s.split(",")],
        default=[1, 2],
        help="relay serve --workers values to measure (default 1,2; >1 only where the flag exists)",
    )
    parser.add_argument(
        "--subscribers",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[2, 0],
        help="all-events WebSockets kept on Relay; one Relay run per value (default 2,0)",
    )
    parser.add_argument("--no-postgres-ceiling", action="store_true")
    parser.add_argument("--profile", metavar="DIR", help="write py-spy flame graphs of the closed loop")
    parser.add_argument("--profile-servers", default="relay", help="comma-separated; default relay")
    options = parser.parse_args()
    options.profile_servers = options.profile_servers.split(",")
    if options.encryption:
        options.only, options.relay_workers, options.no_postgres_ceiling = ["relay", "encrypted"], [1], True
        options.subscribers = options.subscribers[:1]
    if shutil.which("wrk") is None:
        print("wrk is not installed; install it with `apt-get install -y wrk`", file=sys.stderr)
        return 2
    started = time.monotonic()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        work = Path(tmp)
        postgres = embedded.start(work, delete_on_exit=True)
        admin_dsn = embedded.dsn(postgres)
        ceiling = {}
        if not options.no_postgres_ceiling:
            ceiling_dsn = new_database(admin_dsn, "ceiling")
            ceiling = pgceiling.run(ceiling_dsn, 5.0)
            settle(ceiling_dsn)
        bench = Bench(options, work, postgres)
        results = []
        workers = [w for w in options.relay_workers if w == 1 or relay_has_workers_flag()]
        skipped = sorted(set(options.relay_workers) - set(workers))
        for server in servers(admin_dsn, workers, options.subscribers):
            if options.only and server.kind not in options.only:
                continue
            print(f"measuring {server.name}…", file=sys.stderr, flush=True)
            with (
                server,
                (
                    subscribers(server.port, server.subscribers)
                    if server.subscribers
                    else contextlib.nullcontext({})
                ) as fanout,
            ):
                result = bench.measure(server)
            if server.stored:
                result.stored = asyncio.run(_sql(*server.stored))  # type: ignore[assignment]
                settle(server.stored[0])
            if server.relay:
                # Rows committed by one transaction share its xmin: the mean group-commit size.
                query = "SELECT count(*)::float8 / greatest(count(DISTINCT xmin::text), 1) FROM events"
                per_batch = asyncio.run(_sql(server.stored[0], query))  # type: ignore[index]
                result.notes.append(f"{per_batch:.1f} rows per transaction on average")
            if fanout:
                result.notes.append(
                    f"{server.subscribers} all-events WebSocket subscribers received {fanout['events']:,} "
                    f"events ({fanout['reconnects']} reconnects after falling behind), using "
                    f"{fanout['cpu_seconds']:.1f} CPU-seconds over the {result.seconds:.0f} s of its run"
                )
            results.append(result)
        print_tables(results, ceiling, options)
        if skipped:
            print(
                f"- relay --workers {','.join(map(str, skipped))} not measured: "
                "this relay serve has no --workers flag"
            )
    print(f"\n(total {time.monotonic() - started:.0f}s; load average {os.getloadavg()[0]:.2f} at end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
