"""Replicate's answers as Relay's errors, and retries: counts and honoured delays, end to end."""

from __future__ import annotations

import time
from email.utils import formatdate

import pytest

from service.core.retry import retry_after_seconds

from .fake_replicate import (
    CREATE,
    QWEN,
    TOKEN,
    Answer,
    FakeReplicate,
    api_client,
    error_of,
    metric,
    relay_for,
)
from .support import ADMIN_TOKEN, free_port

CREATE_PATH = f"/models/{QWEN}/predictions"


@pytest.fixture
def prediction_id(api, fake: FakeReplicate) -> str:
    created = api.post("/api/predictions", json=CREATE).json()["id"]
    fake.reset()
    return created


def gaps(calls) -> list[float]:
    return [later.at - earlier.at for earlier, later in zip(calls, calls[1:], strict=False)]


@pytest.mark.parametrize(
    ("answer", "status", "code", "says"),
    [
        (
            Answer(400, body={"detail": "bad version id", "status": 400}),
            400,
            "INVALID_REQUEST",
            "bad version id",
        ),
        (
            Answer(422, body={"detail": "- input.mask: required", "status": 422}),
            400,
            "INVALID_REQUEST",
            "input.mask",
        ),
        (Answer(401), 401, "AUTHENTICATION_ERROR", "REPLICATE_API_TOKEN"),
        (Answer(403), 401, "AUTHENTICATION_ERROR", "REPLICATE_API_TOKEN"),
        (Answer(404), 404, "NOT_FOUND", "no such model"),
        (Answer(413, body={"detail": "file exceeds 100MB"}), 413, "FILE_TOO_LARGE", "100MB"),
        (Answer(429, headers={"Retry-After": "30"}), 429, "RATE_LIMIT_ERROR", "rate limit"),
        (Answer(500), 502, "PROCESSING_ERROR", "500"),
        (Answer(503, body=b"<html>down</html>"), 502, "PROCESSING_ERROR", "503"),
        (Answer(418), 502, "UNKNOWN_ERROR", "418"),
        (Answer(201, body=b"not json"), 502, "UNKNOWN_ERROR", "not a JSON object"),
        (Answer(201, body=[1, 2]), 502, "UNKNOWN_ERROR", "not a JSON object"),
    ],
)
def test_upstream_answers_map_to_relay_error_codes(api, fake, answer, status, code, says):
    fake.script("POST", CREATE_PATH, answer)
    got_status, got_code, message = error_of(api.post("/api/predictions", json=CREATE))
    assert (got_status, got_code) == (status, code)
    assert says in message


def test_a_create_is_not_retried_after_a_5xx(api, fake):
    """A 5xx may mean the prediction was made: retrying could run (and bill) it twice."""
    fake.script("POST", CREATE_PATH, Answer(500), Answer(500))
    assert error_of(api.post("/api/predictions", json=CREATE))[:2] == (502, "PROCESSING_ERROR")
    assert len(fake.calls("POST", CREATE_PATH)) == 1


def test_a_create_times_out_without_a_retry(api, fake):
    fake.script("POST", CREATE_PATH, Answer(delay=1.5, passthrough=True))
    status, code, message = error_of(api.post("/api/predictions", json=CREATE))
    assert (status, code) == (504, "TIMEOUT") and "RELAY_UPSTREAM_TIMEOUT" in message
    assert len(fake.calls("POST", CREATE_PATH)) == 1


def test_a_create_is_retried_after_a_429_once_retry_after_has_passed(api, fake):
    fake.script("POST", CREATE_PATH, Answer(429, headers={"Retry-After": "1"}))
    response = api.post("/api/predictions", json=CREATE)
    assert response.status_code == 201, response.text
    calls = fake.calls("POST", CREATE_PATH)
    assert len(calls) == 2 and gaps(calls)[0] >= 1.0


def test_a_get_retries_5xx_with_growing_backoff_then_succeeds(api, fake, prediction_id):
    path = f"/predictions/{prediction_id}"
    fake.script("GET", path, Answer(500), Answer(502))
    response = api.get(f"/api/predictions/{prediction_id}")
    assert response.status_code == 200 and response.json()["id"] == prediction_id
    calls = fake.calls("GET", path)
    assert len(calls) == 3
    first, second = gaps(calls)
    assert 0.2 <= first < 1.0 and 0.4 <= second < 1.5  # 0.2 s then 0.4 s, plus up to 0.2 s of jitter


def test_a_get_gives_up_after_the_configured_retries(api, api_relay, fake, prediction_id):
    path = f"/predictions/{prediction_id}"
    series = ("relay_upstream_requests_total", 'outcome="PROCESSING_ERROR"')
    before = metric(api_relay, *series)
    fake.script("GET", path, Answer(500), Answer(500), Answer(500), Answer(500))
    assert error_of(api.get(f"/api/predictions/{prediction_id}"))[:2] == (502, "PROCESSING_ERROR")
    assert len(fake.calls("GET", path)) == 3  # RELAY_UPSTREAM_RETRIES=2
    assert metric(api_relay, *series) == before + 3


def test_a_get_honours_retry_after_on_429(api, fake, prediction_id):
    path = f"/predictions/{prediction_id}"
    fake.script("GET", path, Answer(429, headers={"Retry-After": "1"}))
    assert api.get(f"/api/predictions/{prediction_id}").status_code == 200
    calls = fake.calls("GET", path)
    assert len(calls) == 2 and gaps(calls)[0] >= 1.0


def test_a_long_retry_after_is_passed_to_the_caller_instead_of_waited_out(api, fake, prediction_id):
    fake.script("GET", f"/predictions/{prediction_id}", Answer(429, headers={"Retry-After": "120"}))
    started = time.monotonic()
    response = api.get(f"/api/predictions/{prediction_id}")
    assert error_of(response)[:2] == (429, "RATE_LIMIT_ERROR") and response.headers["Retry-After"] == "120"
    assert time.monotonic() - started < 5 and len(fake.calls("GET", f"/predictions/{prediction_id}")) == 1


def test_a_slow_get_is_retried_after_its_timeout(api, fake, prediction_id):
    path = f"/predictions/{prediction_id}"
    fake.script("GET", path, Answer(delay=1.5, passthrough=True))
    assert api.get(f"/api/predictions/{prediction_id}").status_code == 200
    assert len(fake.calls("GET", path)) == 2


def test_cancel_and_list_retry_like_reads(api, fake, prediction_id):
    fake.script("POST", f"/predictions/{prediction_id}/cancel", Answer(503))
    fake.script("GET", "/predictions", Answer(429, headers={"Retry-After": "0"}))
    assert api.post(f"/api/predictions/{prediction_id}/cancel").status_code == 200
    assert api.get("/api/predictions").status_code == 200
    assert len(fake.calls("POST", f"/predictions/{prediction_id}/cancel")) == 2
    assert len(fake.calls("GET", "/predictions")) == 2


def test_an_unreachable_upstream_is_a_network_error(postgres, fake):
    with (
        relay_for(
            postgres.new_database(), fake, REPLICATE_API_BASE=f"http://127.0.0.1:{free_port()}/v1"
        ) as relay,
        api_client(relay, ADMIN_TOKEN) as client,  # the admin sees any id (an API key: only its own)
    ):
        series = ("relay_upstream_requests_total", 'outcome="NETWORK_ERROR"')
        status, code, message = error_of(client.get("/api/predictions/p1"))
        assert (status, code) == (502, "NETWORK_ERROR") and "cannot reach" in message
        assert metric(relay, *series) == 3  # a read is retried: 1 + RELAY_UPSTREAM_RETRIES attempts
        assert error_of(client.post("/api/predictions", json=CREATE))[:2] == (502, "NETWORK_ERROR")
        assert metric(relay, *series) == 4  # a create is tried once: it may have reached Replicate


def test_replicate_api_key_is_accepted_in_place_of_replicate_api_token(postgres, fake):
    fake.reset()
    with (
        relay_for(postgres.new_database(), fake, REPLICATE_API_TOKEN="", REPLICATE_API_KEY=TOKEN) as relay,
        api_client(relay) as client,
    ):
        response = client.post("/api/predictions", json=CREATE)
    assert response.status_code == 201, response.text
    assert [call.authorization for call in fake.calls("POST", CREATE_PATH)] == [f"Bearer {TOKEN}"]


def test_the_rate_limit_defaults_to_100_requests_an_hour(postgres, fake):
    with (
        relay_for(postgres.new_database(), fake, RELAY_API_RATE_LIMIT="") as relay,
        api_client(relay) as client,
    ):
        response = client.get("/api/predictions")
    assert response.headers["RateLimit-Limit"] == "100" and response.headers["RateLimit-Remaining"] == "99"


def test_retry_after_is_read_as_seconds_or_an_http_date():
    now = time.time()
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("1.5") == 1.5
    assert 29 <= retry_after_seconds(formatdate(now + 30, usegmt=True), now=now) <= 31
    assert retry_after_seconds(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None
