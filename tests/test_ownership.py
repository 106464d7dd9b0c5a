"""Each prediction belongs to the API key that created it: other keys see nothing of it."""

from __future__ import annotations

import pytest

from service.upstream.ratelimit import key_hash

from .fake_replicate import API_KEY, OTHER_API_KEY, QWEN, QWEN_INPUT, Answer, api_client, error_of
from .support import ADMIN_TOKEN, query

CREATE = {"model": QWEN, "input": QWEN_INPUT}


def owner_in_db(relay, prediction_id: str) -> str | None:
    rows = query(
        relay.env["DATABASE_URL"],
        "SELECT owner FROM prediction_owners WHERE prediction_id = $1",
        prediction_id,
    )
    return rows[0]["owner"] if rows else None


def test_create_records_the_keys_hash_or_admin_as_owner(api, api_relay, fake):
    """The owner is the key's SHA-256 hex (never the key), or 'admin' for the admin token."""
    mine = api.post("/api/predictions", json=CREATE).json()["id"]
    with api_client(api_relay, ADMIN_TOKEN) as admin:
        admins = admin.post("/api/predictions", json=CREATE).json()["id"]
    assert owner_in_db(api_relay, mine) == key_hash(API_KEY)
    assert owner_in_db(api_relay, admins) == "admin"


def test_another_key_gets_404_no_token_and_no_cancel(api, api_relay, fake):
    """Key K2 cannot read, get a token for, or cancel K1's prediction; nothing reaches upstream."""
    fake.hold = True
    prediction_id = api.post("/api/predictions", json=CREATE).json()["id"]
    before = len(fake.requests)
    with api_client(api_relay, OTHER_API_KEY) as other:
        got = other.get(f"/api/predictions/{prediction_id}")
        canceled = other.post(f"/api/predictions/{prediction_id}/cancel")
    assert error_of(got)[:2] == (404, "NOT_FOUND") and "token" not in got.text
    assert error_of(canceled)[:2] == (404, "NOT_FOUND")
    assert len(fake.requests) == before  # neither call went upstream
    assert fake.predictions[prediction_id]["status"] != "canceled"


def test_the_owner_and_the_admin_see_it(api, api_relay, fake):
    prediction_id = api.post("/api/predictions", json=CREATE).json()["id"]
    assert api.get(f"/api/predictions/{prediction_id}").json()["relay"]["token"]
    with api_client(api_relay, ADMIN_TOKEN) as admin:
        assert admin.get(f"/api/predictions/{prediction_id}").json()["relay"]["token"]


def test_lists_show_a_key_only_its_own_predictions(api, api_relay, fake):
    """The list is filtered per key; the admin token sees all of them."""
    fake.predictions.clear()
    mine = api.post("/api/predictions", json=CREATE).json()["id"]
    with api_client(api_relay, OTHER_API_KEY) as other:
        theirs = other.post("/api/predictions", json=CREATE).json()["id"]
        seen_by_other = {p["id"] for p in other.get("/api/predictions").json()["results"]}
    with api_client(api_relay, ADMIN_TOKEN) as admin:
        seen_by_admin = {p["id"] for p in admin.get("/api/predictions").json()["results"]}
    seen_by_me = {p["id"] for p in api.get("/api/predictions").json()["results"]}
    assert seen_by_me == {mine} and seen_by_other == {theirs}
    assert seen_by_admin == {mine, theirs}


def test_a_prediction_created_outside_relay_is_the_admins_only(api, api_relay, fake):
    """No recorded owner: a key gets 404, the admin token still sees it."""
    with api_client(api_relay, ADMIN_TOKEN) as admin:
        prediction_id = admin.post("/api/predictions", json=CREATE).json()["id"]
    query(
        api_relay.env["DATABASE_URL"], "DELETE FROM prediction_owners WHERE prediction_id = $1", prediction_id
    )
    assert error_of(api.get(f"/api/predictions/{prediction_id}"))[0] == 404


def test_an_answer_about_another_prediction_gives_no_token_for_it(api, api_relay, fake):
    """Replicate answering a get or cancel with another prediction is a 502: no data, no token."""
    mine = api.post("/api/predictions", json=CREATE).json()["id"]
    with api_client(api_relay, OTHER_API_KEY) as other:
        theirs = other.post("/api/predictions", json=CREATE).json()["id"]
    stray = Answer(200, body=fake.predictions[theirs])
    fake.script("GET", f"/predictions/{mine}", stray)
    fake.script("POST", f"/predictions/{mine}/cancel", stray)
    for response in (api.get(f"/api/predictions/{mine}"), api.post(f"/api/predictions/{mine}/cancel")):
        assert error_of(response)[:2] == (502, "UNKNOWN_ERROR")
        assert theirs not in response.text and "token" not in response.text


@pytest.mark.parametrize("created", [{"status": "starting"}, {"id": "a\u0000b"}, {"id": "../x"}, {"id": 7}])
def test_a_create_answered_without_a_prediction_id_is_a_502_and_records_nothing(
    api, api_relay, fake, created
):
    """A 201 whose `id` is not a prediction id: UNKNOWN_ERROR, no owner, no token, no 400 or 500."""
    fake.script("POST", f"/models/{QWEN}/predictions", Answer(201, body=created))
    response = api.post("/api/predictions", json=CREATE)
    assert error_of(response)[:2] == (502, "UNKNOWN_ERROR") and "token" not in response.text
    count = query(
        api_relay.env["DATABASE_URL"],
        "SELECT count(*) AS n FROM prediction_owners WHERE NOT (prediction_id ~ '^p[0-9a-f]+$')",
    )
    assert count[0]["n"] == 0
