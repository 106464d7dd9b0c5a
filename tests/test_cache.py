"""The opt-in prediction cache: `"cache": true` on `POST /api/predictions` (service/cache/)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from .fake_replicate import (
    API_KEY,
    OTHER_API_KEY,
    QWEN,
    QWEN_INPUT,
    FakeReplicate,
    api_client,
    relay_for,
    watch,
)
from .fileserver import png
from .support import ADMIN_TOKEN, RelayProcess, admin_headers, query

ENCRYPTION_KEY = base64.b64encode(b"k" * 32).decode()
CACHED = {"model": QWEN, "input": QWEN_INPUT, "cache": True}


@pytest.fixture(scope="module")
def cache_db(postgres) -> str:
    return postgres.new_database()


@pytest.fixture(scope="module")
def cache_relay(cache_db: str, fake: FakeReplicate) -> Iterator[RelayProcess]:
    """Encryption on, so a prediction can be forgotten; prices, so usage can say what was saved."""
    prices = f"{QWEN}=0.5"
    with relay_for(cache_db, fake, RELAY_ENCRYPTION_KEY=ENCRYPTION_KEY, RELAY_PRICES=prices) as process:
        yield process


@pytest.fixture
def client(cache_relay: RelayProcess, fake: FakeReplicate) -> Iterator[httpx.Client]:
    fake.reset()
    with api_client(cache_relay) as http:
        yield http


def finished(relay: RelayProcess, created: dict) -> dict:
    """Wait until the created prediction's stream ends (its terminal event is in the log)."""
    messages, code = watch(relay, created["relay"]["ws"], created["relay"]["token"])
    assert code == 1000, messages
    return messages[-1]


def unique_input(tag: str) -> dict:
    return {**QWEN_INPUT, "prompt": f"cache test {tag}"}


def test_an_identical_request_is_answered_from_the_cache_without_upstream(client, cache_relay, fake):
    """Hit: 200, the source prediction, relay.cached and relay.source; Replicate is not called."""
    body = {**CACHED, "input": unique_input("hit")}
    created = client.post("/api/predictions", json=body)
    assert created.status_code == 201 and "cached" not in created.json()["relay"]
    assert finished(cache_relay, created.json())["status"] == "succeeded"
    fake.reset()
    answer = client.post("/api/predictions", json=body)
    assert answer.status_code == 200, answer.text
    cached = answer.json()
    assert cached["id"] == created.json()["id"] and cached["status"] == "succeeded"
    assert cached["output"] == fake.predictions[cached["id"]]["output"]
    assert cached["relay"]["cached"] is True and cached["relay"]["source"] == cached["id"]
    assert cached["relay"]["ws"].endswith(f"/predictions/{cached['id']}/ws")
    state = httpx.get(f"{cache_relay.url}/predictions/{cached['id']}?token={cached['relay']['token']}")
    assert state.status_code == 200
    assert fake.requests == []


def test_without_cache_true_the_request_goes_upstream(client, cache_relay, fake):
    body = {**CACHED, "input": unique_input("opt-in")}
    finished(cache_relay, client.post("/api/predictions", json=body).json())
    fake.reset()
    assert client.post("/api/predictions", json={**body, "cache": False}).status_code == 201
    assert len(fake.calls("POST", f"/models/{QWEN}/predictions")) == 1


def test_another_api_key_misses(client, cache_relay, fake):
    """Scoped per key: another key (and the admin token, its own scope) never sees the answer."""
    body = {**CACHED, "input": unique_input("scope")}
    finished(cache_relay, client.post("/api/predictions", json=body).json())
    for key in (OTHER_API_KEY, ADMIN_TOKEN):
        fake.reset()
        with api_client(cache_relay, key) as other:
            assert other.post("/api/predictions", json=body).status_code == 201
        assert len(fake.calls("POST", f"/models/{QWEN}/predictions")) == 1


def test_the_input_key_order_and_whitespace_do_not_matter(client, cache_relay, fake):
    values = {"prompt": "cache test order", "image": ["https://example.com/cat.png"], "seed": 7}
    first = client.post("/api/predictions", json={**CACHED, "input": values}).json()
    finished(cache_relay, first)
    fake.reset()
    reordered = '{"cache":true,"input":{ "seed": 7, "image": ["https://example.com/cat.png"],\n'
    reordered += f' "prompt": "cache test order"}}, "model": "{QWEN}"}}'
    answer = client.post("/api/predictions", content=reordered)
    assert answer.status_code == 200 and answer.json()["relay"]["source"] == first["id"]
    assert fake.requests == []


def test_a_different_target_misses(client, cache_relay, fake):
    """Keyed by model/version: the same input for a pinned version is another entry."""
    body = {**CACHED, "input": unique_input("target")}
    finished(cache_relay, client.post("/api/predictions", json=body).json())
    fake.reset()
    pinned = {"version": f"{QWEN}:{'c' * 64}", "input": body["input"], "cache": True}
    assert client.post("/api/predictions", json=pinned).status_code == 201


@pytest.mark.parametrize("outcome", ["failed", "canceled"])
def test_a_prediction_that_did_not_succeed_never_answers(client, cache_relay, fake, outcome):
    body = {**CACHED, "input": unique_input(f"outcome {outcome}")}
    fake.outcome = outcome
    assert finished(cache_relay, client.post("/api/predictions", json=body).json())["status"] == outcome
    fake.reset()
    assert client.post("/api/predictions", json=body).status_code == 201
    assert len(fake.calls("POST", f"/models/{QWEN}/predictions")) == 1


def test_a_prediction_past_the_ttl_never_answers(client, cache_relay, cache_db, fake):
    """RELAY_CACHE_TTL (default a day) counts from the moment the prediction succeeded."""
    body = {**CACHED, "input": unique_input("ttl")}
    created = client.post("/api/predictions", json=body).json()
    finished(cache_relay, created)
    query(cache_db, "UPDATE predictions SET terminal_at = now() - interval '86401 seconds' "
          "WHERE prediction_id = $1", created["id"])  # fmt: skip
    fake.reset()
    assert client.post("/api/predictions", json=body).status_code == 201


def test_a_forgotten_prediction_never_answers(client, cache_relay, cache_db, fake):
    """Erasure (its data key deleted) removes the prediction from the cache in the same transaction."""
    body = {**CACHED, "input": unique_input("erasure")}
    created = client.post("/api/predictions", json=body).json()
    finished(cache_relay, created)
    assert client.post("/api/predictions", json=body).status_code == 200
    forget = httpx.delete(f"{cache_relay.url}/admin/predictions/{created['id']}", headers=admin_headers())
    assert forget.status_code == 200, forget.text
    assert query(cache_db, "SELECT 1 FROM prediction_cache WHERE prediction_id = $1", created["id"]) == []
    fake.reset()
    answer = client.post("/api/predictions", json=body)
    assert answer.status_code == 201 and answer.json()["id"] != created["id"]


def test_usage_reports_cached_answers_and_what_they_saved(client, cache_relay, cache_db, fake):
    before = httpx.get(f"{cache_relay.url}/admin/usage", headers=admin_headers()).json()["cached"]
    body = {**CACHED, "input": unique_input("usage")}
    created = client.post("/api/predictions", json=body).json()
    finished(cache_relay, created)
    for _ in range(2):
        assert client.post("/api/predictions", json=body).status_code == 200
    [row] = query(cache_db, "SELECT predict_time FROM predictions WHERE prediction_id = $1", created["id"])
    after = httpx.get(f"{cache_relay.url}/admin/usage", headers=admin_headers()).json()["cached"]
    assert after["answers"] == before["answers"] + 2
    saved = after["predict_time_saved"] - before["predict_time_saved"]
    assert saved == pytest.approx(2 * row["predict_time"], abs=0.01)
    assert after["cost_saved"] - before["cost_saved"] == pytest.approx(saved * 0.5, abs=0.01)
    [line] = [g for g in after["groups"] if g["model"] == QWEN]
    assert line["answers"] >= 2
    table = subprocess.run([sys.executable, "-m", "service", "usage"], env=cache_relay.env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert f"cached answers: {after['answers']}, saving" in table.stdout.splitlines()[-1]


def test_the_cache_survives_a_restart(cache_db, fake):
    """Kept in Postgres: a new process (or another instance) answers from it."""
    fake.reset()
    body = {**CACHED, "input": unique_input("restart")}
    with relay_for(cache_db, fake, RELAY_ENCRYPTION_KEY=ENCRYPTION_KEY) as first, api_client(first) as http:
        created = http.post("/api/predictions", json=body).json()
        finished(first, created)
    with (
        relay_for(cache_db, fake, RELAY_ENCRYPTION_KEY=ENCRYPTION_KEY) as second,
        api_client(second, API_KEY) as http,
    ):
        answer = http.post("/api/predictions", json=body)
    assert answer.status_code == 200 and answer.json()["relay"]["source"] == created["id"]


def test_a_cached_answer_points_at_the_archived_copies(postgres, files, tmp_path):
    """Replicate deletes outputs after an hour: a cached answer serves Relay's stored copies."""
    body = png(7, 40)
    url = files.add("/cached/out.png", body)
    places = {"RELAY_ARCHIVE": (tmp_path / "files").as_uri(), "RELAY_DATA_DIR": str(tmp_path)}
    with (
        FakeReplicate() as fake,
        relay_for(postgres.new_database(), fake, RELAY_ARCHIVE_HOSTS=files.origin, **places) as relay,
        api_client(relay) as http,
    ):
        fake.output = [url]
        request = {**CACHED, "input": unique_input("archived")}
        created = http.post("/api/predictions", json=request).json()
        finished(relay, created)
        deadline = time.monotonic() + 30
        while (
            http.get(f"/predictions/{created['id']}", headers=admin_headers()).json()["archive"][0]["status"]
            != "stored"
        ):
            assert time.monotonic() < deadline, "the output was never archived"
            time.sleep(0.1)
        answer = http.post("/api/predictions", json=request).json()
    copy = f"/files/{hashlib.sha256(body).hexdigest()}"
    assert answer["relay"]["cached"] is True and answer["output"] == [relay.url + copy]
    assert answer["archive"][0]["url"] == url and answer["archive"][0]["file"] == copy


def test_an_input_with_an_unpaired_surrogate_is_a_400_not_a_500(client, cache_relay, fake):
    """JSON may escape a lone surrogate (\\ud800), which no UTF-8 request upstream can carry:
    refused before the cache key or Replicate (it was a 500)."""
    body = json.dumps({**CACHED, "model": "someone/other", "input": {"p": "\ud800 cache"}})
    response = client.post("/api/predictions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "unpaired UTF-16 surrogate" in response.json()["error"]["message"]
    assert fake.requests == []
