"""POST /webhooks/replicate: every row of the contract's table, against a real relay serve."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import asyncpg
import httpx
import pytest
from standardwebhooks import Webhook

from service.ops.simulate import lifecycle

from .support import (
    WEBHOOK_KEY,
    WEBHOOK_SECRET,
    RelayProcess,
    new_prediction_id,
    new_webhook_id,
    post_webhook,
    relay_env,
)


def stored_rows(dsn: str, prediction_id: str) -> list[asyncpg.Record]:
    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(
                "SELECT seq, webhook_id, body, status FROM events WHERE prediction_id = $1 ORDER BY seq",
                prediction_id,
            )
        finally:
            await conn.close()

    return asyncio.run(fetch())


def a_prediction(status: str = "starting") -> dict:
    body = lifecycle(new_prediction_id())[0]
    return {**body, "status": status}


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


def test_new_delivery_is_stored_and_acknowledged_with_its_seq(client, relay):
    prediction = a_prediction()
    response = post_webhook(client, prediction)
    assert response.status_code == 200
    answer = response.json()
    assert answer["duplicate"] is False and answer["seq"] > 0
    rows = stored_rows(relay.env["DATABASE_URL"], prediction["id"])
    assert [r["seq"] for r in rows] == [answer["seq"]]


def test_other_methods_on_the_webhook_url_are_405(client):
    assert client.get("/webhooks/replicate").status_code == 405


def test_retried_delivery_adds_no_row_and_reports_the_first_seq(client, relay):
    """A retried delivery (same webhook-id) adds no row."""
    prediction, webhook_id = a_prediction(), new_webhook_id()
    first = post_webhook(client, prediction, webhook_id=webhook_id).json()
    again = post_webhook(client, prediction, webhook_id=webhook_id).json()
    assert again == {"seq": first["seq"], "duplicate": True}
    assert len(stored_rows(relay.env["DATABASE_URL"], prediction["id"])) == 1


def test_signature_from_the_standardwebhooks_library_is_accepted(client):
    body = json.dumps(a_prediction())
    webhook_id = new_webhook_id()
    now = time.time()
    from datetime import UTC, datetime

    signature = Webhook(WEBHOOK_SECRET).sign(webhook_id, datetime.fromtimestamp(now, UTC), body)
    headers = {"webhook-id": webhook_id, "webhook-timestamp": str(int(now)), "webhook-signature": signature}
    response = client.post("/webhooks/replicate", content=body, headers=headers)
    assert response.status_code == 200, response.text


def test_signature_keyed_with_the_undecoded_secret_text_is_refused(client):
    """Some published samples key HMAC with the base64 text itself; those signatures are wrong."""
    body = json.dumps(a_prediction()).encode()
    webhook_id, ts = new_webhook_id(), int(time.time())
    wrong_key = WEBHOOK_SECRET.removeprefix("whsec_").encode()
    digest = hmac.new(wrong_key, f"{webhook_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    headers = {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }
    response = client.post("/webhooks/replicate", content=body, headers=headers)
    assert response.status_code == 401 and error_code(response) == "INVALID_SIGNATURE"


def test_wrong_secret_is_refused_and_nothing_is_stored(client, relay):
    prediction = a_prediction()
    response = post_webhook(client, prediction, key=b"another-secret-entirely")
    assert response.status_code == 401 and error_code(response) == "INVALID_SIGNATURE"
    assert stored_rows(relay.env["DATABASE_URL"], prediction["id"]) == []


def test_tampered_body_is_refused(client):
    body = json.dumps(a_prediction()).encode()
    from service.core.signatures import signed_headers

    headers = signed_headers(WEBHOOK_KEY, new_webhook_id(), body)
    response = client.post("/webhooks/replicate", content=body + b" ", headers=headers)
    assert response.status_code == 401


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_signature_header_is_401(client, missing):
    body = json.dumps(a_prediction()).encode()
    from service.core.signatures import signed_headers

    headers = signed_headers(WEBHOOK_KEY, new_webhook_id(), body)
    del headers[missing]
    response = client.post("/webhooks/replicate", content=body, headers=headers)
    assert response.status_code == 401 and error_code(response) == "MISSING_SIGNATURE"
    assert missing in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "header, value",
    [
        ("webhook-signature", "v1,!!!not-base64!!!"),
        ("webhook-signature", "v1"),
        ("webhook-signature", "v1AAAA"),
        ("webhook-signature", "garbage"),
        ("webhook-signature", "v2," + base64.b64encode(b"x" * 32).decode()),
        ("webhook-signature", " ".join(["v1," + base64.b64encode(b"z" * 32).decode()] * 300)),
        ("webhook-timestamp", "12.5"),
        ("webhook-timestamp", "-100"),
        ("webhook-timestamp", "9" * 40),
        ("webhook-timestamp", "１２３".encode().decode("latin-1")),
        ("webhook-id", "x" * 1000),
    ],
)
def test_malformed_signature_headers_are_a_clean_401(client, header, value):
    body = json.dumps(a_prediction()).encode()
    from service.core.signatures import signed_headers

    headers = {**signed_headers(WEBHOOK_KEY, new_webhook_id(), body), header: value.encode("latin-1")}
    response = client.post("/webhooks/replicate", content=body, headers=headers)
    assert response.status_code == 401, response.text
    assert error_code(response) in {"INVALID_SIGNATURE", "MISSING_SIGNATURE", "TIMESTAMP_OUT_OF_TOLERANCE"}


def test_a_valid_signature_among_many_wrong_ones_is_accepted(client):
    """Rotation at the sender: any v1 entry may match."""
    body = json.dumps(a_prediction()).encode()
    from service.core.signatures import signed_headers

    headers = signed_headers(WEBHOOK_KEY, new_webhook_id(), body)
    wrong = " ".join(["v1," + base64.b64encode(b"w" * 32).decode()] * 50)
    headers["webhook-signature"] = f"{wrong} {headers['webhook-signature']}"
    assert client.post("/webhooks/replicate", content=body, headers=headers).status_code == 200


@pytest.mark.parametrize("offset", [-301, 301])
def test_timestamp_one_second_past_tolerance_is_refused(client, offset):
    now = int(time.time())
    timestamp = now + offset + (1 if offset > 0 else 0)
    response = post_webhook(client, a_prediction(), timestamp=timestamp)
    assert response.status_code == 401 and error_code(response) == "TIMESTAMP_OUT_OF_TOLERANCE"


@pytest.mark.parametrize("offset", [-290, 290])
def test_timestamp_within_tolerance_is_accepted(client, offset):
    response = post_webhook(client, a_prediction(), timestamp=int(time.time()) + offset)
    assert response.status_code == 200


def test_body_over_the_limit_is_413_by_content_length(client):
    body = b'{"id": "x", "status": "starting", "pad": "' + b"a" * (4 * 1024 * 1024) + b'"}'
    response = post_webhook(client, body)
    assert response.status_code == 413 and error_code(response) == "BODY_TOO_LARGE"


def test_body_over_the_limit_is_413_when_streamed_without_length(client):
    from service.core.signatures import signed_headers

    headers = signed_headers(WEBHOOK_KEY, new_webhook_id(), b"irrelevant")

    def chunks():
        for _ in range(80):
            yield b"a" * 65536

    response = client.post("/webhooks/replicate", content=chunks(), headers=headers)
    assert response.status_code == 413


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2, 3]",
        b'"a string"',
        b'{"status": "starting"}',
        b'{"id": "p1"}',
        b'{"id": 12, "status": "starting"}',
        b'{"id": "p1", "status": null}',
        b'{"id": "", "status": "starting"}',
        b'{"id": "p\\u0000", "status": "starting"}',
        b"\xff\xfe not utf8",
    ],
)
def test_signed_but_invalid_payload_is_400_and_not_stored(client, relay, body):
    webhook_id = new_webhook_id()
    response = post_webhook(client, body, webhook_id=webhook_id)
    assert response.status_code == 400 and error_code(response) == "INVALID_PAYLOAD"

    async def count() -> int:
        conn = await asyncpg.connect(relay.env["DATABASE_URL"])
        try:
            return await conn.fetchval("SELECT count(*) FROM events WHERE webhook_id = $1", webhook_id)
        finally:
            await conn.close()

    assert asyncio.run(count()) == 0


def test_exact_bytes_are_stored_including_json_that_jsonb_refuses(client, relay):
    prediction_id = new_prediction_id()
    body = (
        f'{{ "id" : "{prediction_id}",\n "status":"processing",  "logs": "nul:\\u0000 and \\ud83d\\ude00 é",'
        ' "output": null , "extra": 1.50e3 }'
    ).encode()
    response = post_webhook(client, body)
    assert response.status_code == 200
    rows = stored_rows(relay.env["DATABASE_URL"], prediction_id)
    assert rows[0]["body"] == body
    events = client.get(
        f"/predictions/{prediction_id}/events",
        headers={"Authorization": "Bearer " + relay.env["RELAY_ADMIN_TOKEN"]},
    ).json()["events"]
    assert events[0]["prediction"]["logs"] == "nul:\x00 and 😀 é"


def test_unknown_status_is_stored_not_rejected(client, relay):
    prediction = a_prediction("quantum-superposition")
    assert post_webhook(client, prediction).status_code == 200
    assert stored_rows(relay.env["DATABASE_URL"], prediction["id"])[0]["status"] == "quantum-superposition"


def test_both_secrets_are_accepted_during_rotation(postgres):
    old, new = b"old-secret-for-rotation-test!", b"new-secret-for-rotation-test!"
    secrets = " ".join("whsec_" + base64.b64encode(k).decode().rstrip("=") for k in (old, new))
    env = relay_env(postgres.new_database(), REPLICATE_WEBHOOK_SECRET=secrets)
    with RelayProcess(env) as relay, httpx.Client(base_url=relay.url) as http:
        assert post_webhook(http, a_prediction(), key=old).status_code == 200
        assert post_webhook(http, a_prediction(), key=new).status_code == 200
        assert post_webhook(http, a_prediction(), key=b"neither").status_code == 401
