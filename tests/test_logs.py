"""RELAY_LOG_FORMAT=json: one object a line from a real `relay serve`, with context fields,
refused webhooks logged once, an access log without tokens, and nothing personal or secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from websockets.sync.client import connect

from service.core.auth import mint_token
from service.core.logcontext import ContextFilter, bound, request_id_from
from service.ops.simulate import lifecycle
from service.web.logs import RelayJsonFormatter, redact_tokens

from .batch_support import submit, wait_for, wait_until_ended
from .fake_replicate import QWEN, api_client, relay_for
from .support import (
    SUBSCRIBE_KEY,
    WEBHOOK_KEY,
    RelayProcess,
    admin_headers,
    assert_no_secret,
    free_port,
    new_prediction_id,
    new_webhook_id,
    post_webhook,
)

PROMPT = "a very personal prompt about Zebulon"
IMAGE_URL = "https://replicate.delivery/pbxt/personal-photo-8675309.png"


def json_lines(output: str) -> list[dict]:
    """Every log line (stderr; the banner's plain lines on stdout are skipped) as an object."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def json_relay(postgres, fake) -> Iterator[RelayProcess]:
    with relay_for(postgres.new_database(), fake, RELAY_LOG_FORMAT="json", RELAY_LOG_LEVEL="DEBUG") as relay:
        yield relay


@pytest.fixture(scope="module")
def traffic(json_relay: RelayProcess, fake) -> dict:
    """One of each thing worth logging, sent once for the module; what was sent, to look for."""
    prediction_id = new_prediction_id()
    body = lifecycle(prediction_id)[-1]
    body["input"] = {"prompt": PROMPT, "image": [IMAGE_URL]}
    token = mint_token(SUBSCRIBE_KEY, prediction_id)
    sent = {"prediction_id": prediction_id, "token": token, "stored_id": new_webhook_id()}
    with httpx.Client(base_url=json_relay.url) as http:
        stored = post_webhook(
            http, body, webhook_id=sent["stored_id"], headers={"X-Request-ID": "req-stored-1"}
        )
        sent["seq"] = stored.json()["seq"]
        sent["echoed"] = stored.headers["x-request-id"]
        sent["refused_id"] = new_webhook_id()
        refused = post_webhook(http, body, webhook_id=sent["refused_id"], key=b"not-the-key")
        sent["refused_status"] = refused.status_code
        sent["generated"] = http.get("/healthz").headers["x-request-id"]
        sent["unsafe"] = http.get("/healthz", headers={"X-Request-ID": 'bad id "forged"'}).headers[
            "x-request-id"
        ]
        assert http.get(f"/predictions/{prediction_id}/events?token={token}&limit=5").status_code == 200
    with connect(f"{json_relay.ws_url}/predictions/{prediction_id}/ws?token={token}") as socket:
        while json.loads(socket.recv(timeout=10))["type"] != "caught_up":
            pass
    with api_client(json_relay) as api:
        created = api.post(
            "/api/predictions", json={"model": QWEN, "input": {"prompt": PROMPT, "image": [IMAGE_URL]}}
        )
        assert created.status_code == 201
    with httpx.Client(base_url=json_relay.url, headers=admin_headers()) as admin:
        assert admin.get("/admin/events", params={"prediction_id": prediction_id}).status_code == 200
    fake_done(fake)
    json_relay.stop()
    sent["output"] = json_relay.read_output()
    return sent


def fake_done(fake) -> None:
    import time

    deadline = time.monotonic() + 10
    while fake.tasks and time.monotonic() < deadline:
        time.sleep(0.02)


def test_every_log_line_is_one_json_object_with_the_standard_fields(traffic):
    lines = [line for line in traffic["output"].splitlines() if line and not line.startswith(" ")]
    logged = [line for line in lines if not line.startswith("Relay listening")]
    assert logged and all(line.startswith("{") for line in logged), logged[:3]
    for record in json_lines(traffic["output"]):
        assert {"time", "level", "logger", "message"} <= set(record)
        assert record["time"].endswith("+00:00")


def test_an_accepted_webhook_is_logged_with_its_request_webhook_prediction_and_seq(traffic):
    assert traffic["echoed"] == "req-stored-1"
    [access] = [r for r in json_lines(traffic["output"]) if r.get("request_id") == "req-stored-1"]
    assert access["logger"] == "uvicorn.access" and access["status"] == 200
    assert access["webhook_id"] == traffic["stored_id"]
    assert access["prediction_id"] == traffic["prediction_id"] and access["seq"] == traffic["seq"]
    assert access["http_method"] == "POST" and access["path"] == "/webhooks/replicate"


def test_a_refused_webhook_is_logged_once_with_its_code_and_id(traffic):
    assert traffic["refused_status"] == 401
    refusals = [r for r in json_lines(traffic["output"]) if r["logger"] == "relay.webhooks"]
    [refused] = [r for r in refusals if r.get("webhook_id") == traffic["refused_id"]]
    assert refused["level"] == "WARNING" and refused["code"] == "INVALID_SIGNATURE"
    assert refused["request_id"]


def test_a_request_id_is_generated_when_missing_or_unsafe(traffic):
    assert len(traffic["generated"]) == 32 and traffic["unsafe"] != 'bad id "forged"'
    ids = {r.get("request_id") for r in json_lines(traffic["output"]) if r["logger"] == "uvicorn.access"}
    assert {traffic["generated"], traffic["unsafe"]} <= ids


def test_the_access_log_redacts_tokens(traffic):
    reads = [r for r in json_lines(traffic["output"]) if "/events" in r.get("path", "")]
    assert any("token=[redacted]&limit=5" in r["path"] for r in reads)
    assert traffic["token"] not in traffic["output"]


def test_no_body_input_token_or_secret_appears_in_the_logs(traffic):
    output = traffic["output"]
    for personal in (PROMPT, "Zebulon", IMAGE_URL, "8675309", "replicate.delivery", traffic["token"]):
        assert personal not in output
    assert WEBHOOK_KEY.decode() not in output
    assert_no_secret(output)


def test_batch_and_destination_ids_bound_by_a_job_reach_the_json_line():
    """Jobs (batches, destinations) bind their ids with `bound`; the handler's filter adds them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RelayJsonFormatter("%(message)s"))
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("relay.test_logs")
    logger.addHandler(handler)
    try:
        with bound(batch_id="b1", destination_id="d1", prediction_id="p1"):
            logger.warning("sending")
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
    inside, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (inside["batch_id"], inside["destination_id"], inside["prediction_id"]) == ("b1", "d1", "p1")
    assert "batch_id" not in after


@pytest.mark.parametrize(
    ("path", "redacted"),
    [
        ("/p/ws?token=abc.def", "/p/ws?token=[redacted]"),
        ("/e?after=3&token=x&limit=2", "/e?after=3&token=[redacted]&limit=2"),
        ("/e?TOKEN=x", "/e?TOKEN=[redacted]"),
        ("/e?mytoken=x", "/e?mytoken=x"),
    ],
)
def test_redact_tokens(path, redacted):
    assert redact_tokens(path) == redacted


def test_request_ids_are_plain_tokens():
    assert request_id_from("abc-123") == "abc-123"
    assert request_id_from("x" * 129) != "x" * 129 and request_id_from('a"b') != 'a"b'


def test_a_batch_and_a_destination_bind_their_ids_in_a_real_serve(postgres, fake):
    """The batch scheduler's and a destination sender's own lines carry batch_id / destination_id."""
    env = {"RELAY_LOG_FORMAT": "json", "RELAY_RETRY_SCHEDULE": "0"}
    with relay_for(postgres.new_database(), fake, **env) as relay, api_client(relay) as api:
        fake.reset()
        batch = submit(api, 2, 2)
        wait_until_ended(api, batch["id"])
        with httpx.Client(base_url=relay.url, headers=admin_headers()) as admin:
            closed = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: every attempt fails
            added = admin.post("/admin/destinations", json={"url": closed, "from": "start"})
            assert added.status_code == 201, added.text
            destination_id = added.json()["id"]
            post_webhook(admin, lifecycle(new_prediction_id())[0])

            def exhausted() -> bool:
                listed = admin.get("/admin/destinations").json()["destinations"]
                return any(d["id"] == destination_id and d["exhausted"] for d in listed)

            wait_for(exhausted, what="the destination's event to be exhausted")
    lines = json_lines(relay.read_output())
    assert any(line.get("batch_id") == batch["id"] and "ended" in line["message"] for line in lines)
    assert any(
        line.get("destination_id") == destination_id and "exhausted" in line["message"] for line in lines
    )
