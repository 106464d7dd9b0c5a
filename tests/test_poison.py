"""One delivery's content never fails its neighbours, and no 2xx precedes a failed COMMIT."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest

from service.core.errors import DatabaseUnavailable, InvalidPayload
from service.core.signatures import signed_headers
from service.db.store import Delivery
from service.ingest.committer import GroupCommitter

from .support import WEBHOOK_KEY, new_prediction_id, new_webhook_id, post_webhook, query, running_relay

# Random, so that it does not compress: its index row is larger than Postgres allows (~2.7 kB).
POISON_ID = secrets.token_urlsafe(6000)


def prediction(prediction_id: str) -> bytes:
    return json.dumps({"id": prediction_id, "status": "starting", "version": "v1"}).encode()


async def post_all(url: str, bodies: list[bytes]) -> list[int]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

        async def post(body: bytes) -> int:
            headers = signed_headers(WEBHOOK_KEY, new_webhook_id(), body)
            return (await http.post("/webhooks/replicate", content=body, headers=headers)).status_code

        return await asyncio.gather(*(post(body) for body in bodies))


def test_one_poison_among_100_concurrent_deliveries_fails_alone(relay):
    """100 innocent deliveries get 200 and are stored; the poison gets 400."""
    bodies = [prediction(new_prediction_id()) for _ in range(100)]
    bodies.insert(50, prediction(POISON_ID))
    statuses = asyncio.run(post_all(relay.url, bodies))
    assert sorted(statuses) == [200] * 100 + [400]
    assert statuses[50] == 400


@pytest.mark.parametrize("field", ["id", "status", "model", "version"])
def test_overlong_identifying_fields_are_400_at_parse(client, field):
    body = {"id": new_prediction_id(), "status": "starting", field: "x" * 3000}
    response = post_webhook(client, body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_PAYLOAD"
    assert field in response.json()["error"]["message"]


def delivery(prediction_id: str) -> Delivery:
    return Delivery(
        webhook_id=new_webhook_id(),
        prediction_id=prediction_id,
        status="starting",
        source="webhook",
        body=prediction(prediction_id[:30]),
        received_at=datetime.now(UTC),
    )


async def commit_together(dsn: str, deliveries: list[Delivery]) -> list[object]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    committer = GroupCommitter(pool)
    committer.start()
    try:
        return await asyncio.gather(*(committer.submit(d) for d in deliveries), return_exceptions=True)
    finally:
        await committer.stop()
        await pool.close()


def test_a_row_the_database_refuses_is_isolated_in_its_batch(dsn):
    """A row past parse that Postgres refuses (index row too large) is one 400; the rest commit."""
    deliveries = [delivery(new_prediction_id()) for _ in range(100)]
    deliveries.insert(37, delivery(POISON_ID))
    results = asyncio.run(commit_together(dsn, deliveries))
    assert isinstance(results[37], InvalidPayload)
    others = results[:37] + results[38:]
    assert not any(isinstance(r, BaseException) for r in others)
    assert query(dsn, "SELECT count(*) FROM events")[0][0] == 100


async def execute(dsn: str, script: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(script)
    finally:
        await conn.close()


FAIL_AT_COMMIT = """
CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'refused at commit'; END $$;
CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON events
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.prediction_id LIKE 'failatcommit%') EXECUTE FUNCTION refuse_at_commit();
"""


@pytest.mark.parametrize("encrypted", [False, True], ids=["clear", "encrypted"])
def test_a_commit_that_fails_after_the_insert_is_a_503_never_a_2xx(postgres, encrypted):
    """A deferred constraint trigger raises at COMMIT, after the rows were inserted: the client
    gets 503, the row is not stored, and the same delivery is new once the fault is gone."""
    dsn = postgres.new_database()
    asyncio.run(execute(dsn, FAIL_AT_COMMIT))
    extra = {"RELAY_ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode()} if encrypted else {}
    webhook_id = new_webhook_id()
    body = prediction("failatcommit" + new_prediction_id())
    with running_relay(dsn, **extra) as relay, httpx.Client(base_url=relay.url, timeout=30) as http:
        refused = post_webhook(http, body, webhook_id=webhook_id)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == DatabaseUnavailable.code
        assert query(dsn, "SELECT count(*) FROM events WHERE webhook_id = $1", webhook_id)[0][0] == 0
        query(dsn, "DROP TRIGGER fail_at_commit ON events")
        accepted = post_webhook(http, body, webhook_id=webhook_id)
        assert accepted.status_code == 200 and accepted.json()["duplicate"] is False
