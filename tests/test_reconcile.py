"""Reconcile: Replicate's state fills deliveries that never arrived, once, and only when it is news."""

from __future__ import annotations

import time

import httpx
import pytest

from service.ops.simulate import lifecycle
from service.upstream.reconcile import BATCH

from .fake_replicate import CREATE, FakeReplicate, api_client, metric, reconcile_cli, relay_for, watch
from .support import RelayProcess, admin_headers, new_prediction_id, post_webhook

ALL_EVENTS = frozenset({"start", "logs", "output", "completed"})


def create_and_finish(api: httpx.Client, fake: FakeReplicate, lose: set[str] = frozenset()) -> str:
    """Create through Relay; wait until Replicate has finished it (losing the `lose` webhooks)."""
    fake.lose = set(lose)
    prediction_id = api.post("/api/predictions", json=CREATE).json()["id"]
    deadline = time.monotonic() + 10
    while fake.predictions[prediction_id]["status"] != "succeeded" or fake.tasks:
        assert time.monotonic() < deadline, "the fake never finished the prediction"
        time.sleep(0.02)
    return prediction_id


def events_of(relay: RelayProcess, prediction_id: str) -> list[dict]:
    response = httpx.get(f"{relay.url}/predictions/{prediction_id}/events", headers=admin_headers())
    return response.json()["events"] if response.status_code == 200 else []


def test_a_lost_final_delivery_is_appended_once_as_a_reconcile_event(api, api_relay, fake):
    """Reconciling twice appends one event: the second run finds nothing new."""
    prediction_id = create_and_finish(api, fake, lose={"completed"})
    before = events_of(api_relay, prediction_id)
    assert before[-1]["status"] == "processing"
    first = reconcile_cli(api_relay, prediction_id)
    assert first.returncode == 0, first.stderr
    after = events_of(api_relay, prediction_id)
    assert len(after) == len(before) + 1
    event = after[-1]
    assert event["source"] == "reconcile" and event["status"] == "succeeded"
    assert event["prediction"] == fake.predictions[prediction_id]
    assert event["webhook_id"].startswith(f"reconcile_{prediction_id}_")
    assert first.stdout.strip() == f"{prediction_id}: appended seq {event['seq']} (succeeded)"
    second = reconcile_cli(api_relay, prediction_id)
    assert second.returncode == 0 and second.stdout.strip() == f"{prediction_id}: unchanged (succeeded)"
    assert events_of(api_relay, prediction_id) == after
    state = httpx.get(f"{api_relay.url}/predictions/{prediction_id}", headers=admin_headers()).json()
    assert state["status"] == "succeeded" and state["output"] == fake.predictions[prediction_id]["output"]


def test_nothing_is_appended_when_replicate_agrees_with_the_log(api, api_relay, fake):
    prediction_id = create_and_finish(api, fake)
    before = events_of(api_relay, prediction_id)
    result = reconcile_cli(api_relay, prediction_id)
    assert result.returncode == 0 and "unchanged (succeeded)" in result.stdout
    assert events_of(api_relay, prediction_id) == before
    assert all(e["source"] == "webhook" for e in before)


def test_lost_progress_is_appended_while_the_prediction_still_runs(api, api_relay, fake):
    fake.hold, fake.lose = True, set(ALL_EVENTS)  # still running upstream; not one webhook arrived
    prediction_id = api.post("/api/predictions", json=CREATE).json()["id"]
    deadline = time.monotonic() + 5
    while fake.predictions[prediction_id]["output"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    result = reconcile_cli(api_relay, prediction_id)
    assert result.returncode == 0 and "(processing)" in result.stdout
    [event] = events_of(api_relay, prediction_id)
    assert event["source"] == "reconcile" and event["status"] == "processing"
    assert event["prediction"]["output"] == fake.predictions[prediction_id]["output"]
    assert "unchanged (processing)" in reconcile_cli(api_relay, prediction_id).stdout


def test_a_prediction_relay_never_heard_of_is_appended(api, api_relay, fake):
    prediction_id = create_and_finish(api, fake, lose=ALL_EVENTS)
    assert events_of(api_relay, prediction_id) == []
    assert reconcile_cli(api_relay, prediction_id).returncode == 0
    assert [(e["status"], e["source"]) for e in events_of(api_relay, prediction_id)] == [
        ("succeeded", "reconcile")
    ]


def test_without_a_prediction_it_reconciles_every_open_one_past_the_age(api, api_relay, fake):
    prediction_id = create_and_finish(api, fake, lose={"completed"})
    too_young = reconcile_cli(api_relay, RELAY_RECONCILE_AFTER="3600")
    assert too_young.returncode == 0 and prediction_id not in too_young.stdout
    time.sleep(1.1)
    due = reconcile_cli(api_relay, RELAY_RECONCILE_AFTER="1")
    assert due.returncode == 0, due.stderr
    assert f"{prediction_id}: appended" in due.stdout
    assert events_of(api_relay, prediction_id)[-1]["source"] == "reconcile"


def test_a_prediction_unknown_to_replicate_is_reported_as_failed(api_relay):
    result = reconcile_cli(api_relay, "pnotthere")
    assert result.returncode == 1
    assert result.stdout.strip().startswith("pnotthere: failed: NOT_FOUND")
    assert events_of(api_relay, "pnotthere") == []


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("p1",), {"REPLICATE_API_TOKEN": ""}, "REPLICATE_API_TOKEN is not set"),
        (("not/an id",), {}, "is not a prediction id"),
    ],
)
def test_cli_mistakes_exit_2_with_one_line(api_relay, args, env, says):
    result = reconcile_cli(api_relay, *args, **env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and says in result.stderr and "Traceback" not in result.stderr


def test_a_subscriber_sees_the_end_when_the_completed_webhook_never_arrived(postgres, fake):
    """The periodic reconcile closes the stream with the terminal state Replicate reports."""
    fake.reset()
    with (
        relay_for(
            postgres.new_database(), fake, RELAY_RECONCILE_AFTER="1", RELAY_RECONCILE_INTERVAL="1"
        ) as relay,
        api_client(relay) as api,
    ):
        fake.lose = {"completed"}
        prediction = api.post("/api/predictions", json=CREATE).json()
        messages, code = watch(relay, prediction["relay"]["ws"], prediction["relay"]["token"], timeout=15)
        appended = metric(relay, "relay_reconciled_total", 'result="appended"')
    events = [m for m in messages if m["type"] == "event"]
    assert code == 1000 and appended == 1
    assert events[-1]["status"] == "succeeded" and events[-1]["source"] == "reconcile"
    assert [e["source"] for e in events[:-1]] == ["webhook"] * (len(events) - 1)


def test_without_an_upstream_token_nothing_is_reconciled(postgres, fake):
    """With no REPLICATE_API_TOKEN the periodic reconcile is off: no upstream call, no appended event."""
    fake.reset()
    with relay_for(
        postgres.new_database(),
        fake,
        REPLICATE_API_TOKEN="",
        RELAY_RECONCILE_AFTER="1",
        RELAY_RECONCILE_INTERVAL="1",
    ) as relay:
        prediction_id = new_prediction_id()
        with httpx.Client(base_url=relay.url) as client:
            post_webhook(client, lifecycle(prediction_id)[0])
        time.sleep(4)  # four intervals past the age: a running reconcile would have asked Replicate
        events = events_of(relay, prediction_id)
        reconciled = metric(relay, "relay_reconciled_total", 'result="appended"')
    assert [e["status"] for e in events] == ["starting"] and reconciled == 0
    assert fake.requests == []


def test_reconciling_a_running_prediction_twice_appends_the_new_progress(api, api_relay, fake):
    """Still `processing` upstream but further along the second time: a second reconcile event
    (a reconcile id derived from the status alone would call it a duplicate)."""
    fake.hold, fake.lose = True, set(ALL_EVENTS)
    prediction_id = api.post("/api/predictions", json=CREATE).json()["id"]
    deadline = time.monotonic() + 5
    while fake.predictions[prediction_id]["output"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first = reconcile_cli(api_relay, prediction_id)
    assert first.returncode == 0 and "appended" in first.stdout, first.stdout
    progressed = {**fake.predictions[prediction_id], "status": "processing"}
    progressed["logs"] = (progressed.get("logs") or "") + "\n 90%|█████████ | 45/50 [00:09<00:01]"
    fake.predictions[prediction_id] = progressed
    second = reconcile_cli(api_relay, prediction_id)
    assert second.returncode == 0 and "appended" in second.stdout, second.stdout
    events = events_of(api_relay, prediction_id)
    assert [(e["status"], e["source"]) for e in events] == [("processing", "reconcile")] * 2
    assert events[-1]["prediction"]["logs"] == progressed["logs"]
    state = httpx.get(f"{api_relay.url}/predictions/{prediction_id}", headers=admin_headers()).json()
    assert state["logs"] == progressed["logs"] and state["last_seq"] == events[-1]["seq"]


def test_predictions_replicate_does_not_know_do_not_starve_the_periodic_reconcile(postgres, fake):
    """101 open predictions older than a real one, each a 404 upstream (they keep their age):
    the passes go on past them, so the real one still gets its lost end."""
    fake.reset()
    with (
        relay_for(
            postgres.new_database(), fake, RELAY_RECONCILE_AFTER="1", RELAY_RECONCILE_INTERVAL="1"
        ) as relay,
        api_client(relay) as api,
        httpx.Client(base_url=relay.url) as client,
    ):
        unknown = [new_prediction_id() for _ in range(BATCH + 1)]
        for prediction_id in unknown:
            assert post_webhook(client, lifecycle(prediction_id)[0]).status_code == 200
        fake.lose = {"completed"}
        prediction = api.post("/api/predictions", json=CREATE).json()
        messages, code = watch(relay, prediction["relay"]["ws"], prediction["relay"]["token"], timeout=20)
    assert code == 1000 and messages[-1]["status"] == "succeeded" and messages[-1]["source"] == "reconcile"
    asked = {seen.path.removeprefix("/predictions/") for seen in fake.calls("GET", r"/predictions/\w+")}
    assert set(unknown) <= asked


def test_relay_reconcile_without_an_id_takes_every_due_prediction_not_only_a_hundred(api, api_relay, fake):
    """`relay reconcile` does what it says, "every open one past the age", BATCH at a time."""
    with httpx.Client(base_url=api_relay.url) as client:
        for _ in range(BATCH + 1):
            assert post_webhook(client, lifecycle(new_prediction_id())[0]).status_code == 200
    prediction_id = create_and_finish(api, fake, lose={"completed"})
    time.sleep(1.1)
    result = reconcile_cli(api_relay, RELAY_RECONCILE_AFTER="1")
    assert f"{prediction_id}: appended" in result.stdout
    assert events_of(api_relay, prediction_id)[-1]["source"] == "reconcile"
