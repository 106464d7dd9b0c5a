"""`relay serve --workers N`: N processes, one embedded Postgres started once, merged metrics."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from service.ops.simulate import lifecycle

from .support import (
    ADMIN_TOKEN,
    METRICS,
    RelayProcess,
    merged,
    new_prediction_id,
    post_webhook,
    postmaster_running,
    relay_cli,
    relay_env,
    samples,
)

WORKERS = 2


def children(pid: int) -> list[int]:
    """Worker processes of a parent: its children running a multiprocessing spawn."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def postmasters(pgdata: Path) -> int:
    """How many postgres servers run on this data directory."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args[0].endswith(b"/postgres") and str(pgdata).encode() in args:
            count += 1
    return count


def own_samples(metrics_dir: Path, pid: int, tmp_path: Path) -> dict[str, float]:
    """One worker's own samples: its files alone, read by the collector `/metrics` uses."""
    alone = tmp_path / f"worker-{pid}"
    alone.mkdir(exist_ok=True)
    for path in metrics_dir.glob(f"*_{pid}.db"):
        shutil.copy(path, alone / path.name)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(alone))
    return samples(generate_latest(registry).decode())


def deliver_concurrently(url: str, predictions: int) -> int:
    """Lifecycles on parallel connections, so that both workers accept some of them."""

    def one(_: int) -> int:
        with httpx.Client(base_url=url, timeout=30) as client:
            bodies = lifecycle(new_prediction_id())
            assert all(post_webhook(client, body).status_code == 200 for body in bodies)
            return len(bodies)

    with ThreadPoolExecutor(predictions) as pool:
        return sum(pool.map(one, range(predictions)))


def until_every_worker_has(name: str, workers: list[int], act: Callable[[], None], tmp_path: Path) -> None:
    """Repeat `act` (bounded) until each worker's own `name` sample is above 0: which worker
    accepts a connection is the kernel's choice."""
    metrics_dir = tmp_path / "metrics"
    for _ in range(20):
        act()
        if all(own_samples(metrics_dir, pid, tmp_path)[name] > 0 for pid in workers):
            return
    pytest.fail(f"one worker never accepted a connection ({name})")


def test_workers_share_one_embedded_postgres_and_report_merged_metrics(tmp_path):
    """Every worker answers /metrics with all workers' totals: the stored-deliveries counter, the
    ingest-latency histogram's count and the live subscriber gauge."""
    env = relay_env("", RELAY_DATA_DIR=str(tmp_path))
    del env["DATABASE_URL"]  # dev mode: the parent starts the embedded cluster once
    pgdata = tmp_path / "pg"
    relay = RelayProcess(env, args=("--workers", str(WORKERS))).start(timeout=60)
    subscribers = []
    stack = contextlib.ExitStack()
    try:
        workers = children(relay.proc.pid)
        assert len(workers) == WORKERS
        assert postmasters(pgdata) == 1
        delivered = []
        until_every_worker_has(
            METRICS[0], workers, lambda: delivered.append(deliver_concurrently(relay.url, 4)), tmp_path
        )
        count = sum(delivered)
        answers = [merged(relay.url) for _ in range(10)]  # whichever worker answers, all the totals
        assert all(answer == dict(zip(METRICS, (count, count, 0), strict=True)) for answer in answers)

        def subscribe() -> None:
            subscriber = stack.enter_context(connect(f"{relay.ws_url}/events/ws?token={ADMIN_TOKEN}"))
            subscribers.append(subscriber)
            while json.loads(subscriber.recv(timeout=5))["type"] != "caught_up":
                pass  # the backlog: the deliveries above

        until_every_worker_has(METRICS[2], workers, subscribe, tmp_path)
        assert {merged(relay.url)["relay_subscribers"] for _ in range(10)} == {len(subscribers)}
        for subscriber in subscribers[1:]:
            subscriber.close()
        deadline = time.monotonic() + 5
        while merged(relay.url)["relay_subscribers"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {merged(relay.url)["relay_subscribers"] for _ in range(10)} == {1}

        assert relay.stop() == 0
        with pytest.raises(ConnectionClosed):
            subscribers[0].recv(timeout=5)
        assert subscribers[0].close_code == 1001  # going away, as with one process; uvicorn says 1012
    finally:
        stack.close()
        relay.stop()
    assert not postmaster_running(pgdata)
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


def test_workers_flag_must_be_a_positive_number(tmp_path):
    env = {**relay_env("postgresql://unused/db"), "RELAY_DATA_DIR": str(tmp_path)}
    result = relay_cli("serve", "--workers", "0", env=env)
    assert result.returncode == 2
    assert result.stderr == "relay: error: RELAY_WORKERS must be at least 1, got 0\n"
    assert not os.listdir(tmp_path)
