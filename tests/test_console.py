"""`relay events`: the log as a readable table or as the admin API's JSON."""

from __future__ import annotations

import json

from .support import deliver_lifecycle, new_prediction_id, relay_cli


def test_events_prints_a_table_of_the_matching_events(relay, client):
    prediction_id = new_prediction_id()
    seqs = deliver_lifecycle(client, prediction_id, "failed")
    done = relay_cli("events", "--prediction", prediction_id, env=relay.env)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["SEQ", "RECEIVED_AT", "PREDICTION_ID", "STATUS", "SOURCE", "WEBHOOK_ID"]
    assert [int(row.split()[0]) for row in rows] == seqs
    assert rows[-1].split()[2:5] == [prediction_id, "failed", "webhook"]
    limited = relay_cli("events", "--prediction", prediction_id, "--limit", "2", env=relay.env)
    assert len(limited.stdout.splitlines()) == 3
    assert f"more events: add --after {seqs[1]}" in limited.stderr


def test_events_json_is_the_admin_api_shape(relay, client, admin):
    prediction_id = new_prediction_id()
    deliver_lifecycle(client, prediction_id)
    query = ("--prediction", prediction_id, "--status", "succeeded")
    done = relay_cli("events", *query, "--json", env=relay.env)
    assert done.returncode == 0, done.stderr
    api = admin.get("/admin/events", params={"prediction_id": prediction_id, "status": "succeeded"}).json()
    assert json.loads(done.stdout) == api and len(api["events"]) == 1


def test_events_bad_flags_exit_2_with_one_line(relay):
    for args, message in [
        (("--limit", "0"), "--limit must be between 1 and 1000"),
        (("--source", "telegram"), "--source must be one of webhook, reconcile, erasure"),
        (("--until", "2026-02-30"), "--until must be an ISO 8601 time"),
    ]:
        done = relay_cli("events", *args, env=relay.env)
        assert done.returncode == 2 and done.stderr.startswith(f"relay: error: {message}")
        assert done.stderr.count("\n") == 1, done.stderr
    unknown = relay_cli("events", "--colour", "red", env=relay.env)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert unknown.stderr.startswith("relay events: error: unrecognized arguments: --colour red")
