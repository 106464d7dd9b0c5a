"""The admin API: searching the log, and refusing bad input and the wrong tokens."""

from __future__ import annotations

from datetime import datetime

import pytest

from service.core.auth import mint_token

from .support import SUBSCRIBE_KEY, WEBHOOK_SECRET, deliver_lifecycle, new_prediction_id


def seqs_of(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [event["seq"] for event in response.json()["events"]]


def test_search_by_prediction_and_status(client, admin):
    mine, other = new_prediction_id(), new_prediction_id()
    seqs = deliver_lifecycle(client, mine)
    deliver_lifecycle(client, other, "failed")
    assert seqs_of(admin.get("/admin/events", params={"prediction_id": mine})) == seqs
    done = admin.get("/admin/events", params={"prediction_id": mine, "status": "succeeded"}).json()
    assert [e["seq"] for e in done["events"]] == [seqs[-1]]
    event = done["events"][0]
    assert event["type"] == "event" and event["prediction"]["id"] == mine and event["replayed"] is False
    failed = admin.get("/admin/events", params={"status": "failed", "after": seqs[0]})
    assert all(e["prediction_id"] != mine for e in failed.json()["events"])
    assert other in {e["prediction_id"] for e in failed.json()["events"]}


def test_search_pages_with_next_after(client, admin):
    prediction_id = new_prediction_id()
    seqs = deliver_lifecycle(client, prediction_id)
    pages, after = [], 0
    while True:
        page = admin.get("/admin/events", params={"prediction_id": prediction_id, "after": after, "limit": 2})
        pages.append(seqs_of(page))
        if not pages[-1]:
            break
        after = page.json()["next_after"]
    assert [s for page in pages for s in page] == seqs and all(len(p) <= 2 for p in pages)
    assert page.json()["next_after"] == seqs[-1]


def test_search_by_seq_range_and_time(client, admin):
    prediction_id = new_prediction_id()
    seqs = deliver_lifecycle(client, prediction_id)
    inner = admin.get(
        "/admin/events", params={"prediction_id": prediction_id, "after": seqs[0], "before": seqs[-1]}
    )
    assert seqs_of(inner) == seqs[1:-1]
    events = admin.get("/admin/events", params={"prediction_id": prediction_id}).json()["events"]
    moments = [datetime.fromisoformat(e["received_at"]) for e in events]
    middle = moments[2]
    for name, keep in (("since", lambda m: m >= middle), ("until", lambda m: m < middle)):
        found = admin.get(
            "/admin/events", params={"prediction_id": prediction_id, name: events[2]["received_at"]}
        )
        assert seqs_of(found) == [e["seq"] for e, m in zip(events, moments, strict=True) if keep(m)], name
    until = admin.get(
        "/admin/events", params={"prediction_id": prediction_id, "until": "2000-01-01T00:00:00Z"}
    )
    assert seqs_of(until) == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"colour": "red"}, "unknown filter 'colour'"),
        ({"since": "last tuesday"}, "since must be an ISO 8601 time"),
        ({"limit": "0"}, "limit must be between 1 and 1000"),
        ({"limit": "5000"}, "limit must be between 1 and 1000"),
        ({"after": "x"}, "after must be a non-negative integer"),
        ({"source": "fax"}, "source must be one of"),
    ],
)
def test_bad_search_is_400_naming_the_problem(admin, params, message):
    response = admin.get("/admin/events", params=params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST" and message in error["message"]


@pytest.mark.parametrize("path", ["/admin/events", "/admin/replay"])
def test_admin_routes_need_the_admin_token(client, path):
    method = client.get if path == "/admin/events" else client.post
    assert method(path).status_code == 401
    subscriber = {"Authorization": f"Bearer {mint_token(SUBSCRIBE_KEY, '*')}"}
    refused = method(path, headers=subscriber)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "FORBIDDEN"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"target": {"url": "ftp://example.com/x", "secret": WEBHOOK_SECRET}}, "http:// or https://"),
        ({"target": {"url": "https://example.com/x", "secret": "hunter2"}}, "must be a whsec_"),
        ({"target": {"url": "https://example.com/x", "secret": "whsec_!!!"}}, "not valid base64"),
        ({"target": {"fanout": "yes"}}, "target must be"),
        ({"filter": {"colour": "red"}, "target": {"fanout": True}}, "unknown filter 'colour'"),
        ({"filter": {"after": -4}, "target": {"fanout": True}}, "after must be a non-negative integer"),
        ({"target": {"fanout": True}, "dry_run": "no"}, "dry_run must be true or false"),
        ({"target": {"fanout": True}, "speed": 11}, "unknown field 'speed'"),
    ],
)
def test_bad_replay_request_is_400_naming_the_problem(admin, body, message):
    response = admin.post("/admin/replay", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert "hunter2" not in response.text


def test_replay_dry_run_is_the_plan(client, admin):
    prediction_id = new_prediction_id()
    seqs = deliver_lifecycle(client, prediction_id)
    body = {
        "filter": {"prediction_id": prediction_id},
        "target": {"url": "http://127.0.0.1:9/never", "secret": WEBHOOK_SECRET},
        "dry_run": True,
    }
    report = admin.post("/admin/replay", json=body).json()
    assert report["matched"] == len(seqs) and report["delivered"] == 0 and report["failed"] == []
    assert (report["first_seq"], report["last_seq"], report["predictions"]) == (seqs[0], seqs[-1], 1)
