"""POST /admin/replay: a bounded body, safe parsing, background jobs, and no private targets
unless RELAY_REPLAY_PRIVATE is on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from service.core.errors import InvalidRequest
from service.net.guard import public_only
from service.net.http1 import Pool
from service.net.sender import post_signed
from service.ops.replay import UrlTarget, check_target_address

from .receiver import RECEIVER_SECRET, Receiver
from .support import (
    RelayProcess,
    admin_headers,
    deliver_lifecycle,
    new_prediction_id,
    query,
    relay_cli,
    relay_env,
)


def test_a_body_past_the_replay_limit_is_413(admin):
    response = admin.post("/admin/replay", content=b'{"filter": {}, "x": "' + b"a" * 100_000 + b'"}')
    assert response.status_code == 413 and response.json()["error"]["code"] == "BODY_TOO_LARGE"


def test_deeply_nested_json_is_a_400_not_a_500(admin):
    response = admin.post("/admin/replay", content=b"[" * 30_000 + b"]" * 30_000)
    assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_REQUEST"


@contextlib.contextmanager
def hanging_target() -> Iterator[str]:
    """A TCP server that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_a_replay_to_a_hanging_target_answers_202_with_a_job_to_poll_and_cancel(client, admin):
    """The request returns after `wait` seconds with the job; GET shows it running; cancel stops it."""
    prediction_id = new_prediction_id()
    seqs = deliver_lifecycle(client, prediction_id)
    with hanging_target() as url:
        body = {"filter": {"prediction_id": prediction_id}, "target": {"url": url, "secret": RECEIVER_SECRET}}
        started = admin.post("/admin/replay", params={"wait": 1}, json=body)
        assert started.status_code == 202, started.text
        job = started.json()
        assert job["status"] == "running" and started.headers["location"] == job["url"]
        assert job["report"]["matched"] == len(seqs)
        polled = admin.get(job["url"]).json()
        assert polled["id"] == job["job"] and polled["status"] == "running"
        canceled = admin.post(job["url"] + "/cancel").json()
        assert canceled["status"] == "canceled" and canceled["report"]["delivered"] == 0
    assert admin.get(job["url"]).json()["status"] == "canceled"


def test_a_job_that_finishes_reports_done_with_the_report(client, admin, receiver):
    prediction_id = new_prediction_id()
    seqs = deliver_lifecycle(client, prediction_id)
    body = {
        "filter": {"prediction_id": prediction_id},
        "target": {"url": receiver.url + "/hook", "secret": RECEIVER_SECRET},
    }
    answer = admin.post("/admin/replay", params={"wait": 0}, json=body)
    assert answer.status_code in (200, 202)
    url = f"/admin/replay/{answer.json()['job']}"
    deadline = time.monotonic() + 15
    while (job := admin.get(url).json())["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job["status"] == "done" and job["report"]["delivered"] == len(seqs)


def test_any_instance_answers_and_cancels_a_job_and_a_dead_runner_reads_failed(postgres):
    """Two instances on one database (or two workers): the job started on A is polled and
    canceled through B; a job whose process was killed reads `failed`, saying where to resume."""
    dsn = postgres.new_database()
    env = relay_env(dsn)
    with (
        RelayProcess(env) as a,
        RelayProcess(env) as b,
        httpx.Client(base_url=a.url, headers=admin_headers(), timeout=30) as on_a,
        httpx.Client(base_url=b.url, headers=admin_headers(), timeout=30) as on_b,
        hanging_target() as url,
    ):
        seqs = deliver_lifecycle(on_a, new_prediction_id())
        body = {"filter": {"after": seqs[0] - 1}, "target": {"url": url, "secret": RECEIVER_SECRET}}
        job = on_a.post("/admin/replay", params={"wait": 1}, json=body).json()
        polled = on_b.get(job["url"]).json()
        assert polled["status"] == "running" and polled["report"]["matched"] == len(seqs)
        canceled = on_b.post(job["url"] + "/cancel").json()
        assert canceled["status"] == "canceled" and canceled["finished_at"] is not None
        assert on_a.get(job["url"]).json()["status"] == "canceled"

        orphan = on_a.post("/admin/replay", params={"wait": 0}, json=body).json()
        a.stop(signal.SIGKILL)
        assert on_b.get(orphan["url"]).json()["status"] == "running"  # its heartbeat is still fresh
        query(dsn, "UPDATE replay_jobs SET heartbeat_at = now() - interval '1 minute' WHERE id = $1",
              orphan["job"])  # fmt: skip
        dead = on_b.get(orphan["url"]).json()
        assert dead["status"] == "failed" and "resume_after" in dead["error"]


def test_at_most_three_replays_run_at_once_in_a_process(postgres):
    """A fourth concurrent replay is refused (429 with Retry-After) instead of taking the pool
    every route needs; once one is canceled, a new one starts."""
    with (
        RelayProcess(relay_env(postgres.new_database())) as relay,
        httpx.Client(base_url=relay.url, headers=admin_headers(), timeout=30) as admin,
        hanging_target() as url,
    ):
        deliver_lifecycle(admin, new_prediction_id())
        body = {"target": {"url": url, "secret": RECEIVER_SECRET}}
        jobs = [admin.post("/admin/replay", params={"wait": 0}, json=body) for _ in range(3)]
        assert [job.status_code for job in jobs] == [202] * 3
        refused = admin.post("/admin/replay", params={"wait": 0}, json=body)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "TOO_MANY_REPLAYS"
        assert admin.get("/admin/events").status_code == 200  # the pool still serves everything else
        assert admin.post(jobs[0].json()["url"] + "/cancel").json()["status"] == "canceled"
        assert admin.post("/admin/replay", params={"wait": 0}, json=body).status_code == 202


def test_an_unknown_job_is_404(admin):
    assert admin.get("/admin/replay/rpl_nosuchjob").status_code == 404


@pytest.fixture(scope="module")
def guarded(postgres) -> Iterator[RelayProcess]:
    """A server with the default: no replays to private addresses."""
    env = relay_env(postgres.new_database(), RELAY_REPLAY_PRIVATE="")
    with RelayProcess(env) as process:
        yield process


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://[::1]:9/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/hook",
        "http://[::ffff:127.0.0.1]/hook",
    ],
)
def test_replays_to_private_addresses_are_refused_by_default(guarded, url):
    body = {"target": {"url": url, "secret": RECEIVER_SECRET}, "dry_run": True}
    with httpx.Client(base_url=guarded.url, headers=admin_headers(), timeout=30) as admin:
        response = admin.post("/admin/replay", json=body)
    assert response.status_code == 400 and "RELAY_REPLAY_PRIVATE" in response.json()["error"]["message"]


def check(url: str, answers: list[str], allow: bool = False) -> str:
    async def resolve(host: str, port: int) -> list[str]:
        return answers

    try:
        asyncio.run(check_target_address(UrlTarget(url, b"k"), allow, resolve))
    except InvalidRequest as error:
        return error.message
    return "ok"


def test_a_name_is_judged_by_every_address_it_resolves_to():
    assert check("https://hooks.example.com/x", ["93.184.216.34"]) == "ok"
    assert "private" in check("https://hooks.example.com/x", ["93.184.216.34", "10.0.0.7"])
    assert "private" in check("https://rebind.example.com/x", ["fe80::1"])
    assert check("https://hooks.example.com/x", ["10.0.0.7"], allow=True) == "ok"


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://[::1]:9/hook", "http://10.1.2.3/hook"])
def test_destinations_to_private_addresses_are_refused_by_default(guarded, url):
    """The admin API cannot register a destination that would make Relay POST to its neighbours."""
    with httpx.Client(base_url=guarded.url, headers=admin_headers(), timeout=30) as admin:
        response = admin.post("/admin/destinations", json={"url": url})
        assert response.status_code == 400 and "RELAY_REPLAY_PRIVATE" in response.json()["error"]["message"]
        assert admin.get("/admin/destinations").json()["destinations"] == []


def test_the_sender_connects_only_to_a_checked_public_address(receiver: Receiver):
    """A name that resolves to loopback at send time (DNS changed since the check, or rebinding)
    gets nothing: each new connection resolves, checks and connects to the checked address."""

    async def loopback(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    async def attempt(connect_to: object) -> object:
        port = receiver.server_address[1]
        async with Pool(5, 2, connect_to) as http:  # type: ignore[arg-type]
            return await post_signed(http, f"http://hooks.example.com:{port}/hook", b"k", "msg_1", b"{}")

    refused = asyncio.run(attempt(public_only(loopback)))
    assert not refused.ok and refused.reason.startswith("the host resolves to a private")  # type: ignore[attr-defined]
    assert "RELAY_REPLAY_PRIVATE=on" in refused.reason  # type: ignore[attr-defined]
    assert receiver.attempts == []

    async def same(host: str, port: int) -> str:
        return "127.0.0.1"  # what public_only would answer for a public name: the checked address

    assert asyncio.run(attempt(same)).status == 401  # type: ignore[attr-defined]
    assert [path for path, _ in receiver.attempts] == ["/hook"]  # reached through the given address


def test_a_destination_that_now_resolves_to_loopback_gets_nothing(postgres, receiver: Receiver):
    """Added while allowed (here: by a CLI with RELAY_REPLAY_PRIVATE=on), then sent by a server
    with the default: nothing reaches the receiver, and the destination shows why."""
    env = relay_env(postgres.new_database(), RELAY_REPLAY_PRIVATE="")
    with RelayProcess(env) as relay:
        url = receiver.url.replace("127.0.0.1", "localhost") + "/hook"
        refused = relay_cli("destinations", "add", url, env=env)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1
        assert "RELAY_REPLAY_PRIVATE" in refused.stderr
        added = relay_cli("destinations", "add", url, "--json", env={**env, "RELAY_REPLAY_PRIVATE": "on"})
        assert added.returncode == 0, added.stderr
        destination_id = json.loads(added.stdout)["id"]
        with httpx.Client(base_url=relay.url, timeout=30) as client:
            deliver_lifecycle(client, new_prediction_id())
        with httpx.Client(base_url=relay.url, headers=admin_headers(), timeout=30) as admin:
            deadline = time.monotonic() + 30
            while not (found := admin.get(f"/admin/destinations/{destination_id}").json())["last_error"]:
                assert time.monotonic() < deadline, "no attempt was recorded"
                time.sleep(0.1)
    assert "private, loopback or link-local" in found["last_error"]
    assert receiver.attempts == []
