"""`relay serve --workers N`: N processes, one embedded Postgres started once, merged metrics."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from service.simulate import lifecycle

from .support import ADMIN_TOKEN, RelayProcess, new_prediction_id, post_webhook, relay_env
from .test_cli import postmaster_running, relay_cli

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


def stored_deliveries(url: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Connection": "close"}).text
    match = re.search(r'^relay_deliveries_total\{outcome="stored"\} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def deliver_concurrently(url: str, predictions: int) -> int:
    """Lifecycles on parallel connections, so that both workers accept some of them."""

    def one(_: int) -> int:
        with httpx.Client(base_url=url, timeout=30) as client:
            bodies = lifecycle(new_prediction_id())
            assert all(post_webhook(client, body).status_code == 200 for body in bodies)
            return len(bodies)

    with ThreadPoolExecutor(predictions) as pool:
        return sum(pool.map(one, range(predictions)))


def test_workers_share_one_embedded_postgres_and_report_merged_metrics(tmp_path):
    env = relay_env("", RELAY_DATA_DIR=str(tmp_path))
    del env["DATABASE_URL"]  # dev mode: the parent starts the embedded cluster once
    pgdata = tmp_path / "pg"
    relay = RelayProcess(env, args=("--workers", str(WORKERS))).start(timeout=60)
    try:
        workers = children(relay.proc.pid)
        assert len(workers) == WORKERS
        assert postmasters(pgdata) == 1
        count = deliver_concurrently(relay.url, predictions=6)
        files = {p.name for p in (tmp_path / "metrics").glob("counter_*.db")}
        assert files == {f"counter_{pid}.db" for pid in workers}  # one sample file per worker
        answers = {stored_deliveries(relay.url) for _ in range(10)}
        assert answers == {float(count)}  # whichever worker answers, it reports all workers' total
        with connect(f"{relay.ws_url}/events/ws?token={ADMIN_TOKEN}") as subscriber:
            while json.loads(subscriber.recv(timeout=5))["type"] != "caught_up":
                pass  # the backlog: the deliveries above
            assert relay.stop() == 0
            with pytest.raises(ConnectionClosed):
                subscriber.recv(timeout=5)
        assert subscriber.close_code == 1001  # going away, as with one process; uvicorn says 1012
    finally:
        relay.stop()
    assert not postmaster_running(pgdata)
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


def test_workers_flag_must_be_a_positive_number(tmp_path):
    env = {**relay_env("postgresql://unused/db"), "RELAY_DATA_DIR": str(tmp_path)}
    result = relay_cli("serve", "--workers", "0", env=env)
    assert result.returncode == 2
    assert result.stderr == "relay: error: RELAY_WORKERS must be at least 1, got 0\n"
    assert not os.listdir(tmp_path)
