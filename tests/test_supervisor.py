"""Dev mode: `relay serve` restarts the embedded postmaster after a real `kill -9`."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from service.ops.simulate import lifecycle

from .support import RelayProcess, new_prediction_id, post_webhook, relay_env


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "pg" / "postmaster.pid").read_text().splitlines()[0])


def restarted(data_dir: Path, killed: int) -> bool:
    try:
        pid = postmaster_pid(data_dir)
    except (FileNotFoundError, ValueError, IndexError):
        return False
    return pid != killed and running(pid)


def running(pid: int) -> bool:
    """Alive and not a zombie (in a container, PID 1 may never reap an exited postmaster)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_killed_embedded_postmaster_is_restarted_and_relay_recovers(tmp_path):
    """kill -9 of the postmaster: Relay logs it, starts the cluster again, answers 200 again,
    and keeps what was committed before; at exit the new postmaster is stopped."""
    env = relay_env("", RELAY_DATA_DIR=str(tmp_path / "data"))
    del env["DATABASE_URL"]  # dev mode: the embedded cluster under RELAY_DATA_DIR
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    relay = RelayProcess(env).start(timeout=90)
    try:
        with httpx.Client(base_url=relay.url, timeout=30) as http:
            assert post_webhook(http, bodies[0]).status_code == 200
            first = postmaster_pid(tmp_path / "data")
            os.kill(first, signal.SIGKILL)
            # An orphaned backend may still answer for a moment; the new postmaster shows first.
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and not restarted(tmp_path / "data", first):
                time.sleep(0.2)
            assert restarted(tmp_path / "data", first), "the postmaster was not restarted"
            status = 0
            while time.monotonic() < deadline:
                try:
                    status = post_webhook(http, bodies[1]).status_code
                except httpx.HTTPError:
                    status = 0
                if status == 200:
                    break
                time.sleep(0.5)
            assert status == 200, "Relay did not recover after the postmaster was killed"
            events = http.get(
                f"/predictions/{prediction_id}/events",
                headers={"Authorization": "Bearer " + env["RELAY_ADMIN_TOKEN"]},
            )
            assert [e["status"] for e in events.json()["events"]] == ["starting", "processing"]
            second = postmaster_pid(tmp_path / "data")
    finally:
        relay.stop()
    assert "restarting it" in relay.output and "running again" in relay.output
    time.sleep(1)
    assert not running(second), "the restarted postmaster outlived relay serve"
