"""Reading a prediction's state and events over HTTP, behind tokens."""

from __future__ import annotations

import time

from websockets.sync.client import connect

from service.core.auth import mint_token
from service.ops.simulate import lifecycle

from .support import ADMIN_TOKEN, SUBSCRIBE_KEY, deliver_lifecycle, new_prediction_id, post_webhook, relay_cli


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_prediction_state_follows_the_lifecycle(client, admin):
    prediction_id = new_prediction_id()
    seqs = deliver_lifecycle(client, prediction_id)
    state = admin.get(f"/predictions/{prediction_id}").json()
    assert state["status"] == "succeeded"
    assert state["last_seq"] == seqs[-1]
    assert state["event_count"] == len(seqs)
    assert state["output"] == [f"https://replicate.delivery/xezq/{prediction_id}/out-0.webp"]
    assert state["metrics"]["predict_time"] == 4.61
    assert "100%" in state["logs"]


def test_late_processing_never_overwrites_a_terminal_state(client, admin):
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    for body in [bodies[0], bodies[-1], bodies[2]]:  # succeeded arrives before a processing
        assert post_webhook(client, body).status_code == 200
    state = admin.get(f"/predictions/{prediction_id}").json()
    assert state["status"] == "succeeded" and state["event_count"] == 3
    assert state["completed_at"] is not None


def test_first_terminal_state_stays(client, admin):
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    post_webhook(client, bodies[-1])
    post_webhook(client, {**bodies[-1], "status": "canceled"})
    assert admin.get(f"/predictions/{prediction_id}").json()["status"] == "succeeded"


def test_events_page_in_seq_order_with_cursor(client, admin):
    prediction_id = new_prediction_id()
    seqs = deliver_lifecycle(client, prediction_id)
    first = admin.get(f"/predictions/{prediction_id}/events", params={"limit": 2}).json()
    assert [e["seq"] for e in first["events"]] == seqs[:2]
    rest = admin.get(f"/predictions/{prediction_id}/events", params={"after": first["next_after"]}).json()
    assert [e["seq"] for e in rest["events"]] == seqs[2:]
    event = rest["events"][-1]
    assert event["type"] == "event" and event["status"] == "succeeded" and event["source"] == "webhook"
    assert event["replayed"] is False and event["prediction"]["id"] == prediction_id
    assert event["received_at"].endswith("Z") and event["webhook_id"].startswith("msg_")


def test_unknown_prediction_is_404(admin):
    response = admin.get("/predictions/does-not-exist")
    assert response.status_code == 404 and response.json()["error"]["code"] == "NOT_FOUND"


def test_unknown_paths_and_wrong_methods_answer_in_the_error_shape(client):
    missing = client.get("/no/such/route")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
    wrong = client.get("/webhooks/replicate")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert "POST" in wrong.headers["Allow"]


def test_subscriber_token_reads_only_its_prediction(client):
    mine, other = new_prediction_id(), new_prediction_id()
    deliver_lifecycle(client, mine)
    deliver_lifecycle(client, other)
    token = mint_token(SUBSCRIBE_KEY, mine)
    assert client.get(f"/predictions/{mine}", headers=bearer(token)).status_code == 200
    assert client.get(f"/predictions/{mine}/events", params={"token": token}).status_code == 200
    refused = client.get(f"/predictions/{other}", headers=bearer(token))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "FORBIDDEN"


def test_star_token_reads_any_prediction(client):
    prediction_id = new_prediction_id()
    deliver_lifecycle(client, prediction_id)
    token = mint_token(SUBSCRIBE_KEY, "*")
    assert client.get(f"/predictions/{prediction_id}", headers=bearer(token)).status_code == 200


def test_missing_bad_and_expired_tokens_are_refused(client):
    prediction_id = new_prediction_id()
    deliver_lifecycle(client, prediction_id)
    url = f"/predictions/{prediction_id}"
    assert client.get(url).status_code == 401
    assert client.get(url, headers=bearer("not-a-token")).status_code == 403
    forged = mint_token("some-other-key-entirely-0123456789", prediction_id)
    assert client.get(url, headers=bearer(forged)).status_code == 403
    expired = mint_token(SUBSCRIBE_KEY, prediction_id, ttl=-10)
    response = client.get(url, headers=bearer(expired))
    assert response.status_code == 403 and "expired" in response.json()["error"]["message"]
    time.sleep(0)


def test_bad_query_parameters_are_400(admin):
    response = admin.get("/predictions/x/events", params={"after": "-1"})
    assert response.status_code == 400 and "after" in response.json()["error"]["message"]
    assert admin.get("/predictions/x/events", params={"limit": "100000"}).status_code == 400


def test_events_are_served_with_the_exact_text_delivered(client, admin, relay):
    """HTTP pages (prediction and admin) and WebSocket messages carry each body as delivered:
    number spelling, whitespace, key order, escapes and raw UTF-8 are kept, never re-encoded."""
    prediction_id = new_prediction_id()
    text = (
        '{ "status":"succeeded" ,\n\t"id": "ID",  "metrics": {"predict_time": 1.50e3},'
        ' "z": {"b": 1, "a": 2}, "logs": "nul \\u0000 and caf\u00e9 \\ud83d\\ude00" }'
    ).replace("ID", prediction_id)
    assert post_webhook(client, text.encode()).status_code == 200

    page = admin.get(f"/predictions/{prediction_id}/events")
    assert page.status_code == 200 and page.headers["content-type"] == "application/json"
    assert f'"prediction":{text}}}]' in page.text
    assert page.json()["events"][0]["prediction"]["metrics"]["predict_time"] == 1500.0
    search = admin.get("/admin/events", params={"prediction_id": prediction_id})
    assert search.status_code == 200 and f'"prediction":{text}}}]' in search.text
    with connect(f"{relay.ws_url}/predictions/{prediction_id}/ws?token={ADMIN_TOKEN}") as ws:
        message = ws.recv(timeout=5)
    assert message.endswith(f'"prediction":{text}}}')
    cli = relay_cli("events", "--prediction", prediction_id, "--json", env=relay.env)
    assert cli.returncode == 0 and f'"prediction":{text}}}]' in cli.stdout
