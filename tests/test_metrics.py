"""`GET /metrics`: the counters an operator graphs move with real traffic, and leak nothing."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
from websockets.sync.client import connect

from service.ops.simulate import lifecycle

from .support import (
    ADMIN_TOKEN,
    SUBSCRIBE_KEY,
    WEBHOOK_KEY,
    WEBHOOK_SECRET,
    delta,
    new_prediction_id,
    post_webhook,
    scrape,
)


def test_metrics_follow_deliveries_rejects_and_subscribers(relay, client):
    before = scrape(client)
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    url = f"{relay.ws_url}/predictions/{prediction_id}/ws?token={ADMIN_TOKEN}"
    with connect(url) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "caught_up"
        assert delta(before, scrape(client), "relay_subscribers") == 1
        for body in bodies:
            assert post_webhook(client, body).status_code == 200
        received = [json.loads(ws.recv(timeout=10)) for _ in bodies]
    assert [m["status"] for m in received] == [b["status"] for b in bodies]
    post_webhook(client, bodies[0], webhook_id=received[0]["webhook_id"])  # a retry: duplicate
    post_webhook(client, bodies[0], key=b"some-other-key")  # forged: rejected
    post_webhook(client, b"[1, 2]")  # not an object: rejected
    time.sleep(0.2)
    after = scrape(client)
    assert delta(before, after, "relay_deliveries_total", outcome="stored") == len(bodies)
    assert delta(before, after, "relay_deliveries_total", outcome="duplicate") == 1
    assert delta(before, after, "relay_duplicates_total") == 1
    assert delta(before, after, "relay_rejects_total", code="INVALID_SIGNATURE") == 1
    assert delta(before, after, "relay_rejects_total", code="INVALID_PAYLOAD") == 1
    assert delta(before, after, "relay_ingest_seconds_count") == len(bodies) + 1
    assert delta(before, after, "relay_messages_sent_total") == len(bodies)
    assert delta(before, after, "relay_subscribers") == 0
    text = client.get("/metrics").text
    for secret in (ADMIN_TOKEN, SUBSCRIBE_KEY, WEBHOOK_SECRET, WEBHOOK_KEY.decode(), prediction_id):
        assert secret not in text


def test_metrics_count_replay_deliveries(relay, client):
    prediction_id = new_prediction_id()
    for body in lifecycle(prediction_id):
        post_webhook(client, body)
    before = scrape(client)
    answer = client.post(
        "/admin/replay",
        json={"filter": {"prediction_id": prediction_id}, "target": {"fanout": True}},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert answer.status_code == 200, answer.text
    replayed = delta(before, scrape(client), "relay_replay_deliveries_total", outcome="fanout")
    assert replayed == answer.json()["delivered"] == len(lifecycle(prediction_id))


def test_metrics_count_listener_reconnects(relay, client):
    """Killing the hub's LISTEN connection is noticed, counted, and fan-out carries on."""
    before = scrape(client)

    async def kill_listener() -> int:
        conn = await asyncpg.connect(relay.env["DATABASE_URL"])
        try:
            return await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND (query LIKE 'LISTEN%' OR query = 'SELECT 1')"
            )
        finally:
            await conn.close()

    assert asyncio.run(kill_listener()) >= 1
    deadline = time.monotonic() + 10
    while delta(before, scrape(client), "relay_listener_reconnects_total") < 1:
        assert time.monotonic() < deadline, "the LISTEN connection was not re-established"
        time.sleep(0.2)
