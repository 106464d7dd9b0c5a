"""Replay: to a real receiving server that verifies Standard Webhooks, and to live subscribers."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
from websockets.sync.client import connect

from service.db.vault import Vault
from service.live.hub import Hub, Subscriber
from service.ops.simulate import lifecycle

from .receiver import HANG_UP, RECEIVER_SECRET
from .support import (
    ADMIN_TOKEN,
    ROOT,
    deliver_lifecycle,
    delta,
    new_prediction_id,
    post_webhook,
    query,
    relay_cli,
    relay_on_terminal,
    scrape,
)


def stored(admin: httpx.Client, **params: object) -> list[dict]:
    """The stored events matching a filter, through the admin API."""
    return admin.get("/admin/events", params={**params, "limit": 1000}).json()["events"]


def replay_cli(relay, *args: str) -> tuple[int, dict, str]:
    done = relay_cli("replay", "--json", "--quiet", *args, env=relay.env)
    report = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, report, done.stderr


def deliver_batch(client: httpx.Client, predictions: int) -> tuple[int, int]:
    """Several full lifecycles; the (after, before) seq bounds that select exactly them."""
    first = last = None
    for _ in range(predictions):
        seqs = deliver_lifecycle(client, new_prediction_id())
        first = seqs[0] if first is None else first
        last = seqs[-1]
    return first - 1, last + 1


def test_replay_delivers_every_event_once_in_order_with_original_ids(relay, client, admin, receiver):
    after, before = deliver_batch(client, 3)
    events = stored(admin, after=after, before=before)
    code, report, stderr = replay_cli(
        relay, "--after", str(after), "--before", str(before), "--to", receiver.url + "/hook",
        "--secret", RECEIVER_SECRET, "--concurrency", "3",
    )  # fmt: skip
    assert code == 0, stderr
    assert report["matched"] == report["delivered"] == len(events) and report["failed"] == []
    assert (report["first_seq"], report["last_seq"]) == (events[0]["seq"], events[-1]["seq"])
    assert receiver.bad_signatures == 0
    assert sorted(receiver.accepted_ids()) == sorted(e["webhook_id"] for e in events)
    arrived = {webhook_id: position for position, webhook_id in enumerate(receiver.accepted_ids())}
    for prediction in {e["prediction_id"] for e in events}:
        mine = [arrived[e["webhook_id"]] for e in events if e["prediction_id"] == prediction]
        assert mine == sorted(mine), "a prediction's events arrived out of seq order"
    bodies = dict(receiver.accepted)
    assert all(json.loads(bodies[e["webhook_id"]]) == e["prediction"] for e in events)


def test_replay_retries_503_and_429_then_delivers(client, admin, receiver):
    """Through the admin API: a receiver that fails twice, then recovers, gets everything once."""
    prediction_id = new_prediction_id()
    seqs = deliver_lifecycle(client, prediction_id)
    receiver.script = [(503, {}), (429, {"Retry-After": "1"})]
    started = time.monotonic()
    body = {
        "filter": {"prediction_id": prediction_id},
        "target": {"url": receiver.url + "/hook", "secret": RECEIVER_SECRET},
    }
    report = admin.post("/admin/replay", json=body).json()
    assert report["matched"] == report["delivered"] == len(seqs) and report["failed"] == []
    assert time.monotonic() - started >= 1.0, "Retry-After: 1 was not honoured"
    ids = [e["webhook_id"] for e in stored(admin, prediction_id=prediction_id)]
    assert receiver.accepted_ids() == ids
    assert [w for _, w in receiver.attempts[:3]] == [ids[0]] * 3


def test_replay_retries_503_twice_then_delivers_each_event_once(relay, client, admin, receiver):
    prediction_id = new_prediction_id()
    deliver_lifecycle(client, prediction_id)
    receiver.script = [(503, {}), (503, {})]
    code, report, stderr = replay_cli(
        relay, "--prediction", prediction_id, "--to", receiver.url + "/hook", "--secret", RECEIVER_SECRET
    )
    ids = [e["webhook_id"] for e in stored(admin, prediction_id=prediction_id)]
    assert code == 0 and report["delivered"] == len(ids) and report["failed"] == [], stderr
    assert receiver.accepted_ids() == ids
    assert [w for _, w in receiver.attempts] == [ids[0]] * 3 + ids[1:]


def test_replay_retries_after_the_receiver_hangs_up(client, admin, receiver):
    """A connection closed without an answer is a network error: retried, then delivered once."""
    prediction_id = new_prediction_id()
    deliver_lifecycle(client, prediction_id)
    receiver.script = [(HANG_UP, {})]
    before = scrape(admin)
    body = {
        "filter": {"prediction_id": prediction_id},
        "target": {"url": receiver.url + "/hook", "secret": RECEIVER_SECRET},
    }
    report = admin.post("/admin/replay", json=body).json()
    ids = [e["webhook_id"] for e in stored(admin, prediction_id=prediction_id)]
    assert report["delivered"] == len(ids) and report["failed"] == []
    assert receiver.accepted_ids() == ids
    assert [w for _, w in receiver.attempts] == [ids[0]] * 2 + ids[1:]
    after = scrape(admin)
    assert delta(before, after, "relay_replay_deliveries_total", outcome="retried") == 1
    assert delta(before, after, "relay_replay_deliveries_total", outcome="delivered") == len(ids)


def test_replay_signs_with_the_original_id_and_a_fresh_timestamp(relay, client, receiver):
    """Events delivered minutes ago are replayed with their own webhook-id but the time of the replay."""
    prediction_id = new_prediction_id()
    original = int(time.time()) - 240
    for body in lifecycle(prediction_id):
        assert post_webhook(client, body, timestamp=original).status_code == 200
    rows = query(
        relay.env["DATABASE_URL"],
        "SELECT webhook_id, extract(epoch FROM webhook_timestamp)::bigint AS stamp FROM events"
        " WHERE prediction_id = $1 ORDER BY seq",
        prediction_id,
    )
    assert {row["stamp"] for row in rows} == {original}
    started = int(time.time())
    code, report, stderr = replay_cli(
        relay, "--prediction", prediction_id, "--to", receiver.url + "/hook", "--secret", RECEIVER_SECRET
    )
    assert code == 0 and report["delivered"] == len(rows), stderr
    assert receiver.accepted_ids() == [row["webhook_id"] for row in rows]
    assert all(started <= stamp <= time.time() for stamp in receiver.timestamps.values())


def test_replay_does_not_follow_redirects(relay, client, receiver):
    prediction_id = new_prediction_id()
    seqs = deliver_lifecycle(client, prediction_id)
    code, report, _ = replay_cli(
        relay, "--prediction", prediction_id, "--to", receiver.url + "/moved", "--secret", RECEIVER_SECRET
    )
    assert code == 1
    assert report["delivered"] == 0 and report["failed"][0]["seq"] == seqs[0]
    assert "redirect" in report["failed"][0]["reason"] and "302" in report["failed"][0]["reason"]
    assert [path for path, _ in receiver.attempts] == ["/moved"] and receiver.accepted == []


def test_interrupted_replay_resumes_with_after_and_sends_nothing_twice(relay, client, admin, receiver):
    after, before = deliver_batch(client, 2)
    events = stored(admin, after=after, before=before)
    receiver.fail_after = 4
    target = ("--to", receiver.url + "/hook", "--secret", RECEIVER_SECRET, "--before", str(before))
    once = ("--concurrency", "1", "--retries", "0")
    code, report, _ = replay_cli(relay, "--after", str(after), *target, *once)
    assert code == 1 and report["delivered"] == 4
    assert report["failed"] == [{"seq": events[4]["seq"], "reason": "HTTP 500 after 1 attempts"}]
    assert report["resume_after"] == events[3]["seq"]
    readable = relay_cli("replay", "--quiet", "--after", str(after), *target, *once, env=relay.env)
    unsent = len(events) - 1  # the receiver still fails: the first event fails, nothing else is sent
    assert f"delivered 0, failed 1, not sent {unsent} (the run stops at a failure)" in readable.stdout
    assert f"resume with --after {after}" in readable.stdout
    receiver.fail_after = None
    code, report, stderr = replay_cli(relay, "--after", str(report["resume_after"]), *target)
    assert code == 0, stderr
    assert report["delivered"] == len(events) - 4
    assert sorted(receiver.accepted_ids()) == sorted(e["webhook_id"] for e in events)


def test_replay_stopped_with_ctrl_c_says_where_to_resume(relay, client, admin, receiver):
    """Ctrl-C while a delivery is in flight: the run says the seq to resume after, and the
    resumed run delivers the rest, nothing twice."""
    after, before = deliver_batch(client, 1)
    events = stored(admin, after=after, before=before)
    receiver.hold_after = 3
    target = ("--to", receiver.url + "/hook", "--secret", RECEIVER_SECRET, "--before", str(before))
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "replay", "--quiet", "--concurrency", "1", "--after", str(after),
         *target], env=relay.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert receiver.held.wait(30)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    receiver.hold_after = None
    receiver.released.set()
    assert proc.returncode == 130, stderr
    resume = events[2]["seq"]
    assert f"resume with --after {resume}" in stderr and "Traceback" not in stderr
    code, report, stderr = replay_cli(relay, "--after", str(resume), *target)
    assert code == 0 and report["delivered"] == len(events) - 3, stderr
    assert receiver.accepted_ids() == [e["webhook_id"] for e in events]


def test_dry_run_prints_the_plan_and_sends_nothing(relay, client, receiver):
    prediction_id = new_prediction_id()
    seqs = deliver_lifecycle(client, prediction_id)
    done = relay_cli(
        "replay", "--prediction", prediction_id, "--to", receiver.url + "/hook",
        "--secret", RECEIVER_SECRET, "--dry-run", env=relay.env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"matched {len(seqs)} event(s), seq {seqs[0]}..{seqs[-1]}, 1 prediction(s)" in done.stdout
    assert "dry run: nothing sent" in done.stdout
    assert receiver.attempts == []


def test_replay_draws_a_progress_bar_on_a_terminal_only(relay, client):
    """Count out of the planned total, and rate, on a terminal; nothing with --quiet or a pipe."""
    prediction_id = new_prediction_id()
    n = len(deliver_lifecycle(client, prediction_id))
    args = ("replay", "--prediction", prediction_id, "--fanout")
    done, terminal = relay_on_terminal(*args, env=relay.env)
    assert done.returncode == 0 and f"delivered {n}, failed 0" in done.stdout
    assert b"replayed:" in terminal and b"\xe2\x94\x81" in terminal  # rich's bar, U+2501
    assert f"{n}/{n}".encode() in terminal and b"/s)" in terminal
    quiet, terminal = relay_on_terminal(*args, "--quiet", env=relay.env)
    assert quiet.returncode == 0 and f"delivered {n}, failed 0" in quiet.stdout and terminal == b""
    assert relay_cli(*args, env=relay.env).stderr == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--to", "ftp://example.com/hook", "--secret", RECEIVER_SECRET), "http:// or https://"),
        (("--to", "https://example.com/hook", "--secret", "not-a-secret"), "must be a whsec_"),
        (("--to", "https://example.com/hook"), "--to needs --secret"),
        (("--fanout", "--since", "noon"), "--since must be an ISO 8601 time"),
        (("--fanout", "--concurrency", "0"), "--concurrency must be between 1 and 64"),
    ],
)
def test_bad_replay_flags_are_one_line_and_exit_2(relay, args, message):
    done = relay_cli("replay", *args, env=relay.env)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "not-a-secret" not in done.stderr


def receive_json(ws, timeout: float = 10) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def count_rows(relay) -> int:
    return query(relay.env["DATABASE_URL"], "SELECT count(*) AS n FROM events")[0]["n"]


def test_fanout_replay_reaches_a_live_subscriber_without_adding_rows(relay, client, admin):
    """Replayed messages keep their seq, ignore the cursor, never move it and add no row."""
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    seqs = [post_webhook(client, body).json()["seq"] for body in bodies[:2]]
    url = f"{relay.ws_url}/predictions/{prediction_id}/ws?after={seqs[-1]}&token={ADMIN_TOKEN}"
    with connect(url) as ws:
        assert receive_json(ws)["type"] == "caught_up"
        rows = count_rows(relay)
        code, report, stderr = replay_cli(relay, "--prediction", prediction_id, "--fanout")
        assert code == 0 and report["matched"] == report["delivered"] == 2, stderr
        replayed = [receive_json(ws), receive_json(ws)]
        assert [(m["seq"], m["replayed"]) for m in replayed] == [(seqs[0], True), (seqs[1], True)]
        assert replayed[0]["prediction"] == bodies[0] and replayed[1]["status"] == bodies[1]["status"]
        assert count_rows(relay) == rows
        answer = admin.post(
            "/admin/replay", json={"filter": {"prediction_id": prediction_id, "status": "starting"},
                                   "target": {"fanout": True}},
        )  # fmt: skip
        assert answer.json()["delivered"] == 1
        again = receive_json(ws)
        assert (again["seq"], again["replayed"]) == (seqs[0], True)
        live = post_webhook(client, bodies[2]).json()["seq"]
        message = receive_json(ws)
        assert (message["seq"], message["replayed"]) == (live, False)
        final = post_webhook(client, bodies[-1]).json()["seq"]
        assert receive_json(ws)["seq"] == final
        with contextlib.suppress(Exception):
            ws.recv(timeout=5)
        assert ws.close_code == 1000


def test_replayed_terminal_event_does_not_end_a_prediction_stream():
    """The hub marks a replayed terminal event as not terminal, offers it below the subscriber's
    cursor, and leaves its own cursor where it was."""
    hub = Hub(pool=None, connect=None, vault=Vault(()))  # dispatch reads no database
    hub.cursor = 100
    subscriber = Subscriber("p1", queue_size=10)
    hub.subscribe(subscriber)
    row = {
        "seq": 7, "prediction_id": "p1", "status": "succeeded", "webhook_id": "msg_7",
        "source": "webhook", "received_at": None, "encrypted": False,
        "body": b'{"id": "p1", "status": "succeeded"}',
    }  # fmt: skip
    hub.dispatch([row], replayed=True)
    message = subscriber.queue.get_nowait()
    assert (message.seq, message.replayed, message.terminal) == (7, True, False)
    assert json.loads(message.text)["replayed"] is True and hub.cursor == 100
    hub.dispatch([{**row, "seq": 101}])
    assert subscriber.queue.get_nowait().terminal is True and hub.cursor == 101
