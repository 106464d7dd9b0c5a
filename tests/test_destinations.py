"""Destinations: every matching event reaches a real receiver that verifies with `standardwebhooks`,
once per webhook-id, in seq order per prediction, through failures, restarts and two instances."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from service.ops.simulate import lifecycle

from .receiver import RECEIVER_SECRET, Receiver
from .support import (
    ROOT,
    RelayProcess,
    admin_headers,
    deliver_lifecycle,
    new_prediction_id,
    post_webhook,
    query,
    relay_cli,
    relay_env,
)

SCHEDULE = "0,0.3,0.5,1,1,1,1,1,1,1,1,1,1,1,1"  # about 12 s of retries before exhausted


def wait_for(check: Callable[[], object], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def relay_dsn(postgres) -> str:
    return postgres.new_database()


@pytest.fixture(scope="module")
def relay(relay_dsn) -> Iterator[RelayProcess]:
    with RelayProcess(relay_env(relay_dsn, RELAY_RETRY_SCHEDULE=SCHEDULE)) as process:
        yield process


@pytest.fixture
def admin(relay) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=relay.url, timeout=30, headers=admin_headers()) as http:
        yield http
        for found in http.get("/admin/destinations").json()["destinations"]:
            http.delete(f"/admin/destinations/{found['id']}")


def add(admin: httpx.Client, receiver: Receiver, path: str = "/hook", **fields: object) -> dict:
    body = {"url": receiver.url + path, "secret": RECEIVER_SECRET, **fields}
    response = admin.post("/admin/destinations", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def status_of(admin: httpx.Client, destination_id: str) -> dict:
    return admin.get(f"/admin/destinations/{destination_id}").json()


def stored_events(dsn: str, after: int) -> list[dict]:
    rows = query(
        dsn,
        "SELECT seq, webhook_id, prediction_id, status, body FROM events WHERE seq > $1 ORDER BY seq",
        after,
    )
    return [dict(row) for row in rows]


def log_end(dsn: str) -> int:
    return query(dsn, "SELECT coalesce(max(seq), 0) AS end FROM events")[0]["end"]


def interleaved(predictions: int, each: int) -> list[tuple[str, dict]]:
    """`each` processing events per prediction, the predictions' events interleaved."""
    ids = [new_prediction_id() for _ in range(predictions)]
    return [
        (p, {"id": p, "status": "processing", "logs": f"step {step}", "output": None})
        for step in range(each)
        for p in ids
    ]


def assert_in_seq_order_per_prediction(receiver: Receiver, events: list[dict]) -> None:
    first_arrival: dict[str, int] = {}
    for position, webhook_id in enumerate(receiver.accepted_ids()):
        first_arrival.setdefault(webhook_id, position)
    by_prediction: dict[str, list[int]] = {}
    for event in events:
        by_prediction.setdefault(event["prediction_id"], []).append(first_arrival[event["webhook_id"]])
    for prediction_id, positions in by_prediction.items():
        assert positions == sorted(positions), f"{prediction_id}'s events arrived out of seq order"


def test_300_events_of_20_predictions_arrive_once_each_in_order_signed(relay, relay_dsn, admin, receiver):
    """Every event reaches the receiver with its exact bytes, its original webhook-id, relay-seq,
    a valid signature, once, and each prediction's events in seq order."""
    destination = add(admin, receiver)
    start = destination["cursor"]
    with httpx.Client(base_url=relay.url, timeout=30) as client:
        for _, body in interleaved(20, 15):
            assert post_webhook(client, body).status_code == 200
    events = stored_events(relay_dsn, start)
    assert len(events) == 300
    wait_for(lambda: len(set(receiver.accepted_ids())) == 300, what="300 deliveries")
    assert receiver.bad_signatures == 0
    accepted = dict(receiver.accepted)
    for event in events:
        assert accepted[event["webhook_id"]] == event["body"]  # the exact stored bytes
        assert receiver.seqs[event["webhook_id"]] == event["seq"]
    assert len(receiver.accepted) == 300, "an event was sent twice without a failure"
    assert_in_seq_order_per_prediction(receiver, events)
    wait_for(lambda: status_of(admin, destination["id"])["lag"] == 0, what="lag to drain")
    listed = status_of(admin, destination["id"])
    assert listed["cursor"] == events[-1]["seq"] and listed["pending"] == listed["exhausted"] == 0


def test_a_receiver_answering_503_for_a_while_then_200_gets_everything(relay, relay_dsn, admin, receiver):
    """Failures are retried on the schedule (Retry-After honoured) until the receiver recovers."""
    failing_until = time.monotonic() + 5
    receiver.rule = lambda _id, _body: (
        (503, {"Retry-After": "1"}) if time.monotonic() < failing_until else None
    )
    destination = add(admin, receiver)
    with httpx.Client(base_url=relay.url, timeout=30) as client:
        for _, body in interleaved(5, 6):
            assert post_webhook(client, body).status_code == 200
    events = stored_events(relay_dsn, destination["cursor"])
    wait_for(lambda: status_of(admin, destination["id"])["last_error"] is not None, what="a recorded failure")
    failing = status_of(admin, destination["id"])
    assert "503" in failing["last_error"] and failing["lag"] > 0 and failing["pending"] > 0
    wait_for(lambda: len(set(receiver.accepted_ids())) == len(events), timeout=30, what="recovery")
    assert_in_seq_order_per_prediction(receiver, events)
    first = [at for webhook_id, at in receiver.arrivals if webhook_id == events[0]["webhook_id"]]
    gaps = [later - earlier for earlier, later in zip(first, first[1:], strict=False)]
    assert len(gaps) >= 2 and min(gaps) >= 0.9, f"Retry-After: 1 was not honoured ({gaps})"
    wait_for(lambda: status_of(admin, destination["id"])["lag"] == 0, what="lag to drain")
    assert status_of(admin, destination["id"])["exhausted"] == 0


def test_a_failing_prediction_does_not_hold_back_the_others(relay, relay_dsn, admin, receiver):
    """The receiver refuses one prediction's events: the others all arrive; the refused
    prediction's later events wait behind its first."""
    plan = interleaved(6, 5)
    stuck = plan[0][0]
    receiver.rule = lambda _id, body: (500, {}) if json.loads(body).get("id") == stuck else None
    destination = add(admin, receiver)
    with httpx.Client(base_url=relay.url, timeout=30) as client:
        for _, body in plan:
            assert post_webhook(client, body).status_code == 200
    events = stored_events(relay_dsn, destination["cursor"])
    others = [e for e in events if e["prediction_id"] != stuck]
    wait_for(lambda: len(set(receiver.accepted_ids())) == len(others), what="the other predictions")
    assert_in_seq_order_per_prediction(receiver, others)
    mine = [e["webhook_id"] for e in events if e["prediction_id"] == stuck]
    time.sleep(1.5)  # a few retries of the first
    tried = {webhook_id for _, webhook_id in receiver.attempts}
    assert mine[0] in tried and not tried & set(mine[1:]), "a later event went before its prediction's first"
    assert status_of(admin, destination["id"])["pending"] == len(mine)


def test_large_events_past_a_page_of_bytes_are_all_sent(relay, relay_dsn, admin, receiver):
    """A page of the log is cut at 8 MiB of bodies: the sender goes on from the cut, it does not
    skip to the end (60 events of 200 kB: the first page holds about 40 of them)."""
    prediction_id = new_prediction_id()
    with httpx.Client(base_url=relay.url, timeout=30) as client:
        for step in range(60):
            logs = f"step {step} " + "x" * 200_000
            body = {"id": prediction_id, "status": "processing", "logs": logs, "output": None}
            assert post_webhook(client, body).status_code == 200
    events = [e for e in stored_events(relay_dsn, 0) if e["prediction_id"] == prediction_id]
    add(admin, receiver, filter={"prediction_id": prediction_id}, **{"from": "start"})
    wait_for(lambda: len(receiver.accepted) == len(events) == 60, what="all 60 events")
    assert [receiver.seqs[w] for w in receiver.accepted_ids()] == [e["seq"] for e in events]


def test_a_redirect_is_a_failure_and_is_not_followed(relay, admin, receiver):
    """3xx counts as a failure: retried, never followed to its Location."""
    destination = add(admin, receiver, path="/moved")
    with httpx.Client(base_url=relay.url, timeout=30) as client:
        deliver_lifecycle(client, new_prediction_id())

    def failed_with_302() -> bool:
        listed = status_of(admin, destination["id"])
        return (listed["last_error"] or "").startswith("HTTP 302") and listed["pending"] > 0

    wait_for(failed_with_302, what="a 302 counted as a failure")
    assert receiver.accepted == [] and {path for path, _ in receiver.attempts} == {"/moved"}


def test_a_filter_sends_only_matching_events(relay, relay_dsn, admin, receiver):
    destination = add(admin, receiver, filter={"status": "succeeded"})
    with httpx.Client(base_url=relay.url, timeout=30) as client:
        for _ in range(3):
            deliver_lifecycle(client, new_prediction_id())
        deliver_lifecycle(client, new_prediction_id(), "failed")
    events = stored_events(relay_dsn, destination["cursor"])
    succeeded = [e["webhook_id"] for e in events if e["status"] == "succeeded"]
    assert len(succeeded) == 3
    wait_for(lambda: len(receiver.accepted) == 3, what="the succeeded events")
    wait_for(lambda: status_of(admin, destination["id"])["cursor"] == events[-1]["seq"], what="the cursor")
    # Three predictions, sent concurrently: only each prediction's own order is promised.
    assert sorted(receiver.accepted_ids()) == sorted(succeeded)


def test_from_start_sends_the_whole_log_and_from_a_seq_what_follows(relay, relay_dsn, admin, receiver):
    with httpx.Client(base_url=relay.url, timeout=30) as client:
        deliver_lifecycle(client, new_prediction_id())
    end = log_end(relay_dsn)
    everything = add(admin, receiver, **{"from": "start"})
    assert everything["cursor"] == 0
    wait_for(lambda: len(set(receiver.accepted_ids())) == end, what="the whole log")
    later = admin.post("/admin/destinations", json={"url": "http://127.0.0.1:9/hook", "from": end - 2}).json()
    assert later["cursor"] == end - 2


def test_the_secret_is_generated_shown_once_and_never_listed(relay, admin, receiver):
    created = admin.post("/admin/destinations", json={"url": receiver.url + "/hook"}).json()
    assert created["secret"].startswith("whsec_") and len(base64.b64decode(created["secret"][6:])) == 32
    listed = admin.get("/admin/destinations").text + admin.get(f"/admin/destinations/{created['id']}").text
    assert created["secret"] not in listed and "secret" not in json.loads(listed.split("}{")[0] + "}")


@pytest.mark.parametrize(
    "body, says",
    [
        ({"url": "ftp://example.com/hook"}, "http"),
        ({"url": "https://"}, "http"),
        # Accepted before, then every delivery failed with "network error (ValueError)".
        ({"url": "https://example.com:99999/hook"}, "valid port"),
        ({"url": "https://example.com:https/hook"}, "valid port"),
        # Written into the request line as they are: every delivery failed.
        ({"url": "https://example.com/a hook"}, "printable ASCII"),
        ({"url": "https://example.com/caf\u00e9"}, "printable ASCII"),
        ({"url": "https://b\u00fccher.example/hook"}, "printable ASCII"),
        # Credentials were dropped without a word: every delivery got the receiver's 401.
        ({"url": "https://user:secret@example.com/hook"}, "must not hold credentials"),
        ({"url": "https://example.com", "secret": "not-whsec"}, "whsec_"),
        ({"url": "https://example.com", "secret": "whsec_%%%"}, "base64"),
        ({"url": "https://example.com", "filter": {"colour": "red"}}, "unknown filter"),
        ({"url": "https://example.com", "filter": {"after": "3"}}, "unknown filter"),
        ({"url": "https://example.com", "from": 2**62}, "beyond the end of the log"),
        ({"url": "https://example.com", "from": "yesterday"}, "from must be"),
        ({"url": "https://example.com", "colour": 1}, "unknown field"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_input_is_a_400_with_the_error_shape(admin, body, says):
    response = admin.post("/admin/destinations", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST" and says in error["message"]


@pytest.mark.parametrize("raw", ["[" * 100_000, '{"url": "https://example.com", "filter": ' + "[" * 100_000])
def test_a_body_nested_too_deeply_is_a_400_not_a_500(admin, raw):
    response = admin.post("/admin/destinations", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "INVALID_REQUEST"


def test_an_unknown_id_is_a_404_and_the_admin_token_is_required(relay, admin):
    for method, path in (
        ("GET", "/admin/destinations/dst_nope"),
        ("DELETE", "/admin/destinations/dst_nope"),
        ("POST", "/admin/destinations/dst_nope/pause"),
        ("POST", "/admin/destinations/dst_nope/resume"),
        ("POST", "/admin/destinations/dst_nope/retry"),
    ):
        response = admin.request(method, path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "NOT_FOUND", path
    assert httpx.get(relay.url + "/admin/destinations").status_code == 401


def test_the_cli_adds_lists_pauses_retries_and_removes(relay, receiver):
    done = relay_cli(
        "destinations", "add", receiver.url + "/hook", "--status", "succeeded", "--json", env=relay.env
    )
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    assert created["secret"].startswith("whsec_") and created["filter"] == {"status": "succeeded"}
    listed = relay_cli("destinations", "list", env=relay.env)
    assert created["id"] in listed.stdout and created["secret"] not in listed.stdout
    for action in ("pause", "resume", "retry", "remove"):
        done = relay_cli("destinations", action, created["id"], env=relay.env)
        assert done.returncode == 0, done.stderr
    assert created["id"] not in relay_cli("destinations", "list", env=relay.env).stdout


@pytest.mark.parametrize(
    "args",
    [
        ("add", "ftp://example.com"),
        ("add", "http://example.com:80800/hook"),
        ("add", "https://example.com", "--secret", "nope"),
        ("add", "https://example.com", "--from", "99999999999"),
        ("add", "https://example.com", "--since", "yesterday"),
        ("remove", "dst_nope"),
        ("retry", "dst_nope"),
    ],
)
def test_cli_mistakes_exit_2_with_one_line(relay, args):
    done = relay_cli("destinations", *args, env=relay.env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("relay: error: "), done.stderr


def test_a_pause_holds_the_events_already_read_and_resume_sends_the_rest(relay, relay_dsn, admin, receiver):
    """Paused mid-stream, a destination sends nothing more, not even the events it had already
    read from the log; resumed, it sends the rest, each once, in seq order."""
    prediction_id = new_prediction_id()
    with httpx.Client(base_url=relay.url, timeout=30) as client:
        for step in range(150):
            body = {"id": prediction_id, "status": "processing", "logs": f"step {step}", "output": None}
            assert post_webhook(client, body).status_code == 200
    receiver.delay = 0.02  # one prediction: its events go one after another, 50 a second
    destination = add(admin, receiver, filter={"prediction_id": prediction_id}, **{"from": "start"})
    wait_for(lambda: len(receiver.accepted) >= 10, what="the first deliveries")
    assert admin.post(f"/admin/destinations/{destination['id']}/pause").json()["paused"] is True
    time.sleep(0.2)  # the one request in flight when the pause landed may finish
    held = len(receiver.attempts)
    time.sleep(1.0)
    assert len(receiver.attempts) == held, "a paused destination kept sending"
    assert held < 150
    assert admin.post(f"/admin/destinations/{destination['id']}/resume").json()["paused"] is False
    events = [e for e in stored_events(relay_dsn, 0) if e["prediction_id"] == prediction_id]
    wait_for(lambda: len(receiver.accepted) == len(events), what="the rest after resume")
    assert [receiver.seqs[w] for w in receiver.accepted_ids()] == [e["seq"] for e in events]


def test_a_destination_failing_for_days_is_flagged_until_it_succeeds(relay, relay_dsn, admin, receiver):
    receiver.rule = lambda _id, _body: (500, {})
    destination = add(admin, receiver)
    with httpx.Client(base_url=relay.url, timeout=30) as client:
        deliver_lifecycle(client, new_prediction_id())
    wait_for(lambda: status_of(admin, destination["id"])["failing_since"] is not None, what="a failure")
    assert status_of(admin, destination["id"])["failing"] is False  # failing, but not for long
    query(
        relay_dsn,
        "UPDATE destinations SET failing_since = now() - interval '2 days' WHERE id = $1",
        destination["id"],
    )
    assert status_of(admin, destination["id"])["failing"] is True
    assert "FAILING" in relay_cli("destinations", "list", env=relay.env).stdout
    receiver.rule = None
    wait_for(lambda: status_of(admin, destination["id"])["failing_since"] is None, what="the flag to clear")
    assert status_of(admin, destination["id"])["failing"] is False


def test_metrics_count_sends_per_destination(relay, admin, receiver):
    destination = add(admin, receiver)
    with httpx.Client(base_url=relay.url, timeout=30) as client:
        seqs = deliver_lifecycle(client, new_prediction_id())
    wait_for(lambda: len(receiver.accepted) == len(seqs), what="deliveries")
    line = f'relay_destination_events_total{{destination="{destination["id"]}",outcome="sent"}}'

    def sent() -> float:
        text = admin.get("/metrics").text
        found = [row for row in text.splitlines() if row.startswith(line)]
        return float(found[0].split()[-1]) if found else 0.0

    wait_for(lambda: sent() == len(seqs), what="the sent metric")
    assert f'relay_destination_lag_events{{destination="{destination["id"]}"}}' in admin.get("/metrics").text


def test_a_short_schedule_ends_in_exhausted_and_retry_delivers(postgres, receiver):
    """RELAY_RETRY_SCHEDULE=0,0.2,0.5: three attempts, then exhausted; retry sends them again."""
    env = relay_env(postgres.new_database(), RELAY_RETRY_SCHEDULE="0,0.2,0.5")
    with RelayProcess(env) as relay, httpx.Client(base_url=relay.url, headers=admin_headers()) as admin:
        destination = add(admin, receiver)
        receiver.rule = lambda _id, _body: (500, {})
        with httpx.Client(base_url=relay.url, timeout=30) as client:
            seqs = deliver_lifecycle(client, new_prediction_id())
        wait_for(lambda: status_of(admin, destination["id"])["exhausted"] == len(seqs), what="exhausted")
        attempts = [webhook_id for _, webhook_id in receiver.attempts]
        assert all(attempts.count(w) == 3 for w in set(attempts)) and len(set(attempts)) == len(seqs)
        listed = status_of(admin, destination["id"])
        assert listed["pending"] == 0 and listed["lag"] == 0 and "500" in listed["last_error"]
        receiver.rule = None
        retried = admin.post(f"/admin/destinations/{destination['id']}/retry").json()
        assert retried["requeued"] == len(seqs)
        wait_for(lambda: len(receiver.accepted) == len(seqs), what="the retried events")
        assert [receiver.seqs[w] for w in receiver.accepted_ids()] == seqs
        wait_for(lambda: status_of(admin, destination["id"])["exhausted"] == 0, what="nothing exhausted")


def test_a_one_step_schedule_counts_every_exhausted_event(postgres, receiver):
    """RELAY_RETRY_SCHEDULE=0 (one attempt): each failed event is exhausted at once, and counted
    in relay_destination_events_total{outcome="exhausted"} like one whose retries ran out."""
    env = relay_env(postgres.new_database(), RELAY_RETRY_SCHEDULE="0")
    with RelayProcess(env) as relay, httpx.Client(base_url=relay.url, headers=admin_headers()) as admin:
        destination = add(admin, receiver)
        receiver.rule = lambda _id, _body: (500, {})
        with httpx.Client(base_url=relay.url, timeout=30) as client:
            seqs = deliver_lifecycle(client, new_prediction_id())
        wait_for(lambda: status_of(admin, destination["id"])["exhausted"] == len(seqs), what="exhausted")
        assert len(receiver.attempts) == len(seqs)  # one attempt each
        series = f'relay_destination_events_total{{destination="{destination["id"]}",outcome="exhausted"}}'

        def exhausted() -> float:
            found = [row for row in admin.get("/metrics").text.splitlines() if row.startswith(series)]
            return float(found[0].split()[-1]) if found else 0.0

        wait_for(lambda: exhausted() == len(seqs), what="every exhausted event counted")


def test_kill_9_mid_stream_then_restart_loses_nothing(postgres, receiver):
    """The instance dies with requests in flight; its successor sends everything still owed."""
    dsn = postgres.new_database()
    env = relay_env(dsn, RELAY_RETRY_SCHEDULE=SCHEDULE)
    receiver.delay = 0.01
    with RelayProcess(env) as first, httpx.Client(base_url=first.url, headers=admin_headers()) as admin:
        destination = add(admin, receiver)
        receiver.rule = lambda _id, body: (503, {}) if json.loads(body)["logs"] == "step 3" else None
        with httpx.Client(base_url=first.url, timeout=30) as client:
            for _, body in interleaved(20, 15):
                assert post_webhook(client, body).status_code == 200
        wait_for(lambda: len(receiver.accepted) >= 60, what="some deliveries")
        first.stop(signal.SIGKILL)
    receiver.rule = None
    events = stored_events(dsn, destination["cursor"])
    assert len(set(receiver.accepted_ids())) < len(events), "the kill came too late to test anything"
    with RelayProcess(env) as second, httpx.Client(base_url=second.url, headers=admin_headers()) as admin:
        wait_for(lambda: len(set(receiver.accepted_ids())) == len(events), what="every event after restart")
        assert set(receiver.accepted_ids()) == {e["webhook_id"] for e in events}
        assert receiver.bad_signatures == 0
        wait_for(lambda: status_of(admin, destination["id"])["lag"] == 0, what="lag to drain")


def test_two_instances_never_send_an_event_at_the_same_time(postgres, receiver):
    """Each destination is sent by one instance at a time: no webhook-id is ever in flight twice,
    and without failures none is sent twice."""
    env = relay_env(postgres.new_database(), RELAY_RETRY_SCHEDULE=SCHEDULE)
    receiver.delay = 0.005
    with RelayProcess(env) as one, RelayProcess(env) as two:
        with httpx.Client(base_url=one.url, headers=admin_headers()) as admin:
            destination = add(admin, receiver)
        clients = [httpx.Client(base_url=relay.url, timeout=30) for relay in (one, two)]
        try:
            for index, (_, body) in enumerate(interleaved(10, 10)):
                assert post_webhook(clients[index % 2], body).status_code == 200
        finally:
            for client in clients:
                client.close()
        events = stored_events(env["DATABASE_URL"], destination["cursor"])
        wait_for(lambda: len(set(receiver.accepted_ids())) == len(events), what="every event")
        assert receiver.overlaps == 0
        assert len(receiver.attempts) == len(events), "an event was sent twice"
        assert_in_seq_order_per_prediction(receiver, events)


def test_a_forgotten_prediction_is_sent_as_erased_never_in_clear(postgres, receiver):
    """Encryption on: the secret is stored sealed; events of a prediction forgotten before they
    were sent go out as {"erased":true} (with their ids), never the old plaintext."""
    key = base64.b64encode(os.urandom(32)).decode()
    env = relay_env(postgres.new_database(), RELAY_ENCRYPTION_KEY=key, RELAY_RETRY_SCHEDULE=SCHEDULE)
    with RelayProcess(env) as relay, httpx.Client(base_url=relay.url, headers=admin_headers()) as admin:
        destination = add(admin, receiver)
        stored = query(env["DATABASE_URL"], "SELECT secret, kek_id FROM destinations")[0]
        assert stored["kek_id"] is not None and RECEIVER_SECRET.encode() not in stored["secret"]
        assert admin.post(f"/admin/destinations/{destination['id']}/pause").json()["paused"] is True
        prediction_id = new_prediction_id()
        with httpx.Client(base_url=relay.url, timeout=30) as client:
            for body in lifecycle(prediction_id):
                assert post_webhook(client, body).status_code == 200
        assert admin.delete(f"/admin/predictions/{prediction_id}").status_code in (200, 202)
        events = stored_events(env["DATABASE_URL"], destination["cursor"])
        time.sleep(0.5)
        assert receiver.attempts == [], "a paused destination sent"
        assert admin.post(f"/admin/destinations/{destination['id']}/resume").json()["paused"] is False
        wait_for(lambda: len(receiver.accepted) == len(events), what="the erased events")
        assert sorted(receiver.accepted_ids()) == sorted(e["webhook_id"] for e in events)
        assert all(json.loads(body) == {"erased": True} for _, body in receiver.accepted)


def test_a_secret_no_configured_key_opens_stops_its_destination_with_one_error_line(postgres, receiver):
    """Sealed under a key no longer in RELAY_ENCRYPTION_KEY: the destination stops with one error
    line (it was started again, and logged again, every 2 seconds)."""
    dsn = postgres.new_database()
    old, new = (base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    with (
        RelayProcess(relay_env(dsn, RELAY_ENCRYPTION_KEY=old)) as relay,
        httpx.Client(base_url=relay.url, headers=admin_headers()) as admin,
    ):
        add(admin, receiver)
    line = "its secret cannot be read with RELAY_ENCRYPTION_KEY"
    with RelayProcess(relay_env(dsn, RELAY_ENCRYPTION_KEY=new)) as relay:
        wait_for(lambda: line in relay.output, what="the error line")
        time.sleep(5)  # two and a half looks of the sender at its destinations
        assert relay.output.count(line) == 1, relay.output


def test_a_standalone_sender_sends_for_servers_that_do_not(postgres, receiver):
    """RELAY_DESTINATIONS=off: the server sends nothing; `relay destinations run` does, and stops
    on SIGTERM."""
    env = relay_env(postgres.new_database(), RELAY_DESTINATIONS="off", RELAY_RETRY_SCHEDULE=SCHEDULE)
    with RelayProcess(env) as relay, httpx.Client(base_url=relay.url, headers=admin_headers()) as admin:
        add(admin, receiver)
        with httpx.Client(base_url=relay.url, timeout=30) as client:
            seqs = deliver_lifecycle(client, new_prediction_id())
        time.sleep(1)
        assert receiver.attempts == [], "a server with RELAY_DESTINATIONS=off sent"
        sender = subprocess.Popen([sys.executable, "-m", "service", "destinations", "run"], env=env, cwd=ROOT)
        try:
            wait_for(lambda: len(receiver.accepted) == len(seqs), what="the standalone sender")
        finally:
            sender.send_signal(signal.SIGTERM)
            assert sender.wait(20) == 0
    assert [receiver.seqs[w] for w in receiver.accepted_ids()] == seqs


def test_a_secret_is_resealed_under_the_new_key_after_a_rotation(postgres, receiver):
    """Old key second in RELAY_ENCRYPTION_KEY: the sender re-seals the secret under the new one,
    after which the old key can go and the destination still sends."""
    old, new = (base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    dsn = postgres.new_database()
    with (
        RelayProcess(relay_env(dsn, RELAY_ENCRYPTION_KEY=old)) as relay,
        httpx.Client(base_url=relay.url, headers=admin_headers()) as admin,
    ):
        add(admin, receiver)
    sealed_by = query(dsn, "SELECT kek_id FROM destinations")[0]["kek_id"]
    with RelayProcess(relay_env(dsn, RELAY_ENCRYPTION_KEY=f"{new} {old}")):
        wait_for(
            lambda: query(dsn, "SELECT kek_id FROM destinations")[0]["kek_id"] != sealed_by, what="reseal"
        )
    with RelayProcess(relay_env(dsn, RELAY_ENCRYPTION_KEY=new)) as relay:
        with httpx.Client(base_url=relay.url, timeout=30) as client:
            seqs = deliver_lifecycle(client, new_prediction_id())
        wait_for(lambda: len(receiver.accepted) == len(seqs), what="deliveries with the new key only")
    assert receiver.bad_signatures == 0
