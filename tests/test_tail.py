"""`relay tail`: live events in a terminal, resuming after the server goes away."""

from __future__ import annotations

import base64
import json
import queue
import subprocess
import sys
import threading
import time

import httpx

from service.ops.simulate import lifecycle

from .support import (
    ROOT,
    RelayProcess,
    deliver_lifecycle,
    dev_env,
    new_prediction_id,
    post_webhook,
    relay_cli,
    relay_env,
)


class Tail:
    """A running `relay tail` whose stdout lines are collected as they come."""

    def __init__(self, env: dict[str, str], *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "tail", *args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next_line(self, timeout: float = 15) -> str:
        return self.lines.get(timeout=timeout)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        self.reader.join(10)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        with self.proc.stderr:
            return self.proc.stderr.read()


def seq_of(line: str) -> int:
    return int(line.split()[0])


def test_tail_prints_a_prediction_live_and_ends_with_it(relay, client):
    prediction_id = new_prediction_id()
    tail = Tail(relay.env, prediction_id, "--url", relay.url)
    try:
        time.sleep(1.5)  # let it connect: these events arrive live, not from the backlog
        seqs = deliver_lifecycle(client, prediction_id)
        lines = [tail.next_line() for _ in seqs]
        assert tail.proc.wait(15) == 0, "the stream should end after the terminal event"
    finally:
        tail.stop()
    assert [seq_of(line) for line in lines] == seqs
    assert all(prediction_id in line for line in lines)
    assert lines[0].split()[3] == "starting" and lines[-1].split()[3] == "succeeded"
    assert "100%" in lines[-1] and "1 output" in lines[-1]
    assert "replicate.delivery" not in "\n".join(lines), "output URLs are not printed"


def test_tail_after_seq_starts_after_it_with_the_backlog_then_live_events(relay, client):
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    backlog = [post_webhook(client, body).json()["seq"] for body in bodies[:3]]
    tail = Tail(relay.env, prediction_id, "--after", str(backlog[0]), "--url", relay.url)
    try:
        printed = [seq_of(tail.next_line()) for _ in backlog[1:]]
        live = [post_webhook(client, body).json()["seq"] for body in bodies[3:]]
        printed += [seq_of(tail.next_line()) for _ in live]
        assert tail.proc.wait(15) == 0
    finally:
        tail.stop()
    assert printed == backlog[1:] + live


def test_tail_in_dev_mode_takes_the_admin_token_from_the_data_dir(tmp_path):
    data_dir = tmp_path / "relay-data"
    server = RelayProcess(dev_env(data_dir)).start(timeout=60)
    tail = Tail(dev_env(data_dir), "--url", server.url)  # no RELAY_ADMIN_TOKEN in its environment
    try:
        secret = json.loads((data_dir / "secrets.json").read_text())["webhook_secrets"]
        key = base64.b64decode(secret.removeprefix("whsec_"))
        with httpx.Client(base_url=server.url, timeout=30) as http:
            seqs = [
                post_webhook(http, body, key=key).json()["seq"] for body in lifecycle(new_prediction_id())
            ]
        printed = [seq_of(tail.next_line()) for _ in seqs]
    finally:
        stderr = tail.stop()
        server.stop()
    assert printed == seqs, stderr
    refused = relay_cli("tail", "--url", server.url, env=dev_env(tmp_path / "empty"))
    assert refused.returncode == 2 and "no admin token: set RELAY_ADMIN_TOKEN" in refused.stderr


def test_tail_resumes_after_the_server_restarts_without_gaps_or_repeats(postgres):
    dsn = postgres.new_database()
    with RelayProcess(relay_env(dsn)) as writer:
        watched = RelayProcess(relay_env(dsn)).start()
        tail = Tail(relay_env(dsn), "--url", watched.url)
        try:
            with httpx.Client(base_url=writer.url, timeout=30) as http:
                bodies = lifecycle(new_prediction_id())
                first = post_webhook(http, bodies[0]).json()["seq"]
                assert seq_of(tail.next_line()) == first
                watched.stop()
                missed = post_webhook(http, bodies[1]).json()["seq"]  # while tail's server is down
                watched.start()
                later = post_webhook(http, bodies[2]).json()["seq"]
                printed = [seq_of(tail.next_line()), seq_of(tail.next_line())]
            assert printed == [missed, later]
            assert tail.lines.empty()
        finally:
            stderr = tail.stop()
            watched.stop()
    assert f"resuming after seq {first}" in stderr
