"""`/api/predictions` through a real `relay serve` whose upstream is a fake Replicate server."""

from __future__ import annotations

import httpx
import pytest

from service.upstream.versions import mapping_in

from .fake_replicate import (
    API_KEY,
    OTHER_API_KEY,
    QWEN,
    QWEN_INPUT,
    TOKEN,
    VERSION,
    Answer,
    api_client,
    error_of,
    relay_for,
    watch,
)
from .support import ADMIN_TOKEN, RelayProcess, free_port, relay_env


def test_create_by_version_posts_to_predictions_with_relays_webhook(api, api_relay, fake):
    response = api.post("/api/predictions", json={"version": VERSION, "input": QWEN_INPUT})
    assert response.status_code == 201, response.text
    prediction = response.json()
    assert prediction["status"] == "starting" and prediction["version"] == VERSION
    [call] = fake.calls("POST", "/predictions")
    assert call.authorization == f"Bearer {TOKEN}"
    assert call.json["version"] == VERSION and call.json["input"] == QWEN_INPUT
    assert call.json["webhook"] == f"{api_relay.url}/webhooks/replicate"
    assert call.json["webhook_events_filter"] == ["start", "output", "logs", "completed"]
    assert prediction["relay"]["ws"] == f"{api_relay.ws_url}/predictions/{prediction['id']}/ws"
    assert prediction["relay"]["token"]


def test_create_by_model_posts_to_the_models_path_without_a_version(api, fake):
    response = api.post("/api/predictions", json={"model": QWEN, "input": QWEN_INPUT})
    assert response.status_code == 201, response.text
    [call] = fake.calls("POST", f"/models/{QWEN}/predictions")
    assert "version" not in call.json and call.json["input"] == QWEN_INPUT
    assert fake.calls("POST", "/predictions") == []


def test_caller_may_narrow_the_webhook_filter(api, fake):
    body = {"model": QWEN, "input": QWEN_INPUT, "webhook_events_filter": ["completed", "start"]}
    assert api.post("/api/predictions", json=body).status_code == 201
    [call] = fake.calls("POST", f"/models/{QWEN}/predictions")
    assert call.json["webhook_events_filter"] == ["start", "completed"]


@pytest.mark.parametrize("events", [[], ["everything"], "completed", ["completed", 3]])
def test_a_filter_outside_replicates_events_is_refused(api, fake, events):
    body = {"model": QWEN, "input": QWEN_INPUT, "webhook_events_filter": events}
    status, code, message = error_of(api.post("/api/predictions", json=body))
    assert (status, code) == (400, "INVALID_REQUEST") and "webhook_events_filter" in message
    assert fake.requests == []


@pytest.mark.parametrize("webhook", ["https://attacker.example/hook", "RELAYS_OWN", None])
def test_the_webhook_cannot_be_redirected(api, api_relay, fake, webhook):
    """`webhook` is a field Relay owns: refused (400) whatever it holds, even Relay's own URL."""
    if webhook == "RELAYS_OWN":
        webhook = f"{api_relay.url}/webhooks/replicate"
    body = {"model": QWEN, "input": QWEN_INPUT, "webhook": webhook}
    status, code, message = error_of(api.post("/api/predictions", json=body))
    assert (status, code) == (400, "INVALID_REQUEST") and "webhook" in message
    assert fake.requests == []


def test_created_prediction_is_watched_to_success_with_the_returned_token(api, api_relay, fake):
    """Create → Replicate's signed webhooks → the returned ws URL and token see it succeed."""
    prediction = api.post("/api/predictions", json={"model": QWEN, "input": QWEN_INPUT}).json()
    messages, code = watch(api_relay, prediction["relay"]["ws"], prediction["relay"]["token"])
    events = [m for m in messages if m["type"] == "event"]
    assert code == 1000
    assert [e["status"] for e in events][0] == "starting" and events[-1]["status"] == "succeeded"
    assert all(e["prediction_id"] == prediction["id"] and e["source"] == "webhook" for e in events)
    assert events[-1]["prediction"]["output"] == fake.predictions[prediction["id"]]["output"]
    headers = {"Authorization": f"Bearer {prediction['relay']['token']}"}
    state = httpx.get(f"{api_relay.url}/predictions/{prediction['id']}", headers=headers).json()
    assert state["status"] == "succeeded" and state["event_count"] == len(events)


LONG = "x" * 1001
BAD_INPUTS = [
    ({"prompt": "p"}, "input.image is required"),
    ({**QWEN_INPUT, "image": []}, "input.image must be a list of 1 to 4"),
    ({**QWEN_INPUT, "image": ["https://e.com/a.png"] * 5}, "input.image must be a list of 1 to 4"),
    ({**QWEN_INPUT, "image": "https://e.com/a.png"}, "input.image must be a list of 1 to 4"),
    ({**QWEN_INPUT, "image": ["http://e.com/a.png"]}, "input.image must hold only https://"),
    ({**QWEN_INPUT, "image": ["https:///a.png"]}, "input.image must hold only https://"),
    ({**QWEN_INPUT, "image": [42]}, "input.image must hold only https://"),
    ({"image": QWEN_INPUT["image"]}, "input.prompt is required"),
    ({**QWEN_INPUT, "prompt": ""}, "input.prompt must be a string of 1 to 1000"),
    ({**QWEN_INPUT, "prompt": LONG}, "input.prompt must be a string of 1 to 1000"),
    ({**QWEN_INPUT, "prompt": 7}, "input.prompt must be a string of 1 to 1000"),
    ({**QWEN_INPUT, "negative_prompt": LONG}, "input.negative_prompt must be a string of 0 to 1000"),
    ({**QWEN_INPUT, "num_outputs": 0}, "input.num_outputs must be an integer from 1 to 4"),
    ({**QWEN_INPUT, "num_outputs": 5}, "input.num_outputs must be an integer from 1 to 4"),
    ({**QWEN_INPUT, "num_outputs": 1.5}, "input.num_outputs must be an integer from 1 to 4"),
    ({**QWEN_INPUT, "num_outputs": True}, "input.num_outputs must be an integer from 1 to 4"),
    ({**QWEN_INPUT, "guidance_scale": 0.09}, "input.guidance_scale must be a number from 0.1 to 20"),
    ({**QWEN_INPUT, "guidance_scale": 20.01}, "input.guidance_scale must be a number from 0.1 to 20"),
    ({**QWEN_INPUT, "guidance_scale": "7"}, "input.guidance_scale must be a number from 0.1 to 20"),
    ({**QWEN_INPUT, "num_inference_steps": 0}, "input.num_inference_steps must be an integer from 1 to 500"),
    (
        {**QWEN_INPUT, "num_inference_steps": 501},
        "input.num_inference_steps must be an integer from 1 to 500",
    ),
    ({**QWEN_INPUT, "num_inference_steps": 10.5}, "input.num_inference_steps must be an integer"),
    ({**QWEN_INPUT, "seed": 1.5}, "input.seed must be an integer"),
    ({**QWEN_INPUT, "seed": "42"}, "input.seed must be an integer"),
    ({**QWEN_INPUT, "seed": False}, "input.seed must be an integer"),
]


# Every form of a create that names qwen: `model`, and the three forms of `version`. A bare id is
# qwen's once Relay has seen Replicate answer with it (here: the fake's VERSION for qwen).
QWEN_FORMS = {
    "model": {"model": QWEN},
    "version owner/name": {"version": QWEN},
    "version owner/name:id": {"version": f"{QWEN}:{VERSION}"},
    "version bare id": {"version": VERSION},
}


def teach_qwen_version(api, fake):
    """One create through Relay, whose answer names qwen and VERSION, so Relay learns the id."""
    assert api.post("/api/predictions", json={"model": QWEN, "input": QWEN_INPUT}).status_code == 201
    fake.reset()


@pytest.mark.parametrize(("values", "rule"), BAD_INPUTS)
@pytest.mark.parametrize("target", QWEN_FORMS.values(), ids=QWEN_FORMS.keys())
def test_each_qwen_input_rule_is_enforced_before_any_upstream_call(api, fake, target, values, rule):
    """A bad input is a 400 naming the field and the rule, and Replicate is never called."""
    if target == QWEN_FORMS["version bare id"]:
        teach_qwen_version(api, fake)
    status, code, message = error_of(api.post("/api/predictions", json={**target, "input": values}))
    assert (status, code) == (400, "INVALID_REQUEST")
    assert rule in message
    assert fake.requests == []


def test_inputs_at_the_edges_of_every_range_are_accepted(api, fake):
    values = {
        "image": [f"https://e.com/{n}.png" for n in range(4)],
        "prompt": "y" * 1000,
        "negative_prompt": "n" * 1000,
        "num_outputs": 4,
        "guidance_scale": 0.1,
        "num_inference_steps": 500,
        "seed": -1,
        "output_format": "webp",
    }
    response = api.post("/api/predictions", json={"model": QWEN, "input": values})
    assert response.status_code == 201, response.text
    assert fake.calls("POST", f"/models/{QWEN}/predictions")[0].json["input"] == values
    values.update(
        num_outputs=1, guidance_scale=20, num_inference_steps=1, prompt="z", image=values["image"][:1]
    )
    assert api.post("/api/predictions", json={"model": QWEN, "input": values}).status_code == 201


@pytest.mark.parametrize("target", QWEN_FORMS.values(), ids=QWEN_FORMS.keys())
def test_the_seeds_bad_example_is_refused_in_every_form(api, fake, target):
    """Five images, an empty prompt, 5 outputs, guidance 25 and seed 1.5: refused whatever the form."""
    if target == QWEN_FORMS["version bare id"]:
        teach_qwen_version(api, fake)
    bad = {"image": ["https://e.com/a.png"] * 5, "prompt": "", "num_outputs": 5, "guidance_scale": 25}
    for field, value in {**bad, "seed": 1.5}.items():
        status, code, message = error_of(
            api.post("/api/predictions", json={**target, "input": {**QWEN_INPUT, field: value}})
        )
        assert (status, code) == (400, "INVALID_REQUEST") and f"input.{field}" in message
    assert fake.requests == []


@pytest.mark.parametrize("target", QWEN_FORMS.values(), ids=QWEN_FORMS.keys())
def test_a_valid_qwen_input_is_created_in_every_form(api, fake, target):
    if target == QWEN_FORMS["version bare id"]:
        teach_qwen_version(api, fake)
    assert api.post("/api/predictions", json={**target, "input": QWEN_INPUT}).status_code == 201
    [call] = fake.requests
    assert call.json["input"] == QWEN_INPUT and call.json.get("version") == target.get("version")


def test_qwens_version_id_under_another_name_is_still_checked_as_qwen(api, fake):
    """`someone/other:<qwen's id>` runs qwen's version upstream, so its input is qwen's to check."""
    teach_qwen_version(api, fake)
    body = {"version": f"someone/other:{VERSION}", "input": {**QWEN_INPUT, "num_outputs": 5}}
    status, code, message = error_of(api.post("/api/predictions", json=body))
    assert (status, code) == (400, "INVALID_REQUEST") and "input.num_outputs" in message
    assert fake.requests == []


def test_a_bare_id_relay_has_never_seen_passes_through(api, fake):
    """An unknown bare id is not guessed at: like any model without a schema, its input is forwarded."""
    body = {"version": "f" * 64, "input": {"prompt": "", "num_outputs": 99}}
    assert api.post("/api/predictions", json=body).status_code == 201
    assert fake.calls("POST", "/predictions")[0].json["input"] == body["input"]


def test_other_models_pass_through_unvalidated(api, fake):
    body = {"model": "someone/other-model", "input": {"prompt": "", "num_outputs": 99}}
    assert api.post("/api/predictions", json=body).status_code == 201
    assert fake.calls("POST", "/models/someone/other-model/predictions")[0].json["input"] == body["input"]


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        ({"model": "someone/other", "input": ["not", "an", "object"]}, "input must be a JSON object"),
        ({"version": VERSION}, "input must be a JSON object"),
        ({"input": QWEN_INPUT}, "exactly one of version"),
        ({"model": QWEN, "version": VERSION, "input": QWEN_INPUT}, "exactly one of version"),
        ({"model": "no-slash", "input": QWEN_INPUT}, "model must be owner/name"),
        ({"version": "", "input": QWEN_INPUT}, "version must be a non-empty string"),
        ({"version": "qwen/", "input": QWEN_INPUT}, "version must be owner/name, owner/name:version_id"),
        ({"version": f"{QWEN}:", "input": QWEN_INPUT}, "version must be owner/name, owner/name:version_id"),
        ({"version": "has spaces", "input": QWEN_INPUT}, "version must be owner/name, owner/name:version_id"),
        ({"model": QWEN, "input": QWEN_INPUT, "cache": "yes"}, "cache must be true or false"),
        ({"model": QWEN, "input": QWEN_INPUT, "stream": True}, "unknown field(s) ['stream']"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_malformed_create_requests_are_refused_before_any_upstream_call(api, fake, body, rule):
    status, code, message = error_of(api.post("/api/predictions", json=body))
    assert (status, code) == (400, "INVALID_REQUEST") and rule in message
    assert fake.requests == []


def test_a_body_that_is_not_json_is_refused(api, fake):
    status, code, message = error_of(api.post("/api/predictions", content=b"{nope"))
    assert (status, code) == (400, "INVALID_REQUEST") and "not valid JSON" in message
    assert fake.requests == []


def test_a_body_over_the_api_limit_is_413_and_never_forwarded(api, fake):
    body = {"model": "someone/other", "input": {"blob": "a" * 70_000}}
    status, code, _ = error_of(api.post("/api/predictions", json=body))
    assert (status, code) == (413, "BODY_TOO_LARGE")
    assert fake.requests == []


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "UNAUTHORIZED"),
        ({"Authorization": "Bearer not-a-key"}, 403, "FORBIDDEN"),
        ({"Authorization": "Basic " + API_KEY}, 401, "UNAUTHORIZED"),
    ],
)
def test_requests_without_a_valid_key_are_refused(api_relay, fake, headers, status, code):
    fake.reset()
    for method, path in [
        ("POST", "/api/predictions"),
        ("GET", "/api/predictions"),
        ("GET", "/api/predictions/p1"),
    ]:
        response = httpx.request(method, api_relay.url + path, headers=headers, json={"model": QWEN})
        assert error_of(response)[:2] == (status, code)
    assert fake.requests == []


def test_a_subscriber_token_is_not_an_api_key(api, api_relay, fake):
    prediction = api.post("/api/predictions", json={"model": QWEN, "input": QWEN_INPUT}).json()
    with api_client(api_relay, prediction["relay"]["token"]) as subscriber:
        assert error_of(subscriber.get(f"/api/predictions/{prediction['id']}"))[:2] == (403, "FORBIDDEN")


@pytest.mark.parametrize("key", [OTHER_API_KEY, ADMIN_TOKEN])
def test_any_configured_key_and_the_admin_token_are_accepted(api_relay, fake, key):
    with api_client(api_relay, key) as client:
        response = client.get("/api/predictions")
    assert response.status_code == 200 and "results" in response.json()


def test_get_returns_replicates_prediction_with_a_relay_block(api, fake):
    created = api.post("/api/predictions", json={"model": QWEN, "input": QWEN_INPUT}).json()
    response = api.get(f"/api/predictions/{created['id']}")
    assert response.status_code == 200
    got = response.json()
    assert got["id"] == created["id"] and got["input"] == QWEN_INPUT
    assert got["relay"]["ws"] == created["relay"]["ws"] and got["relay"]["token"]
    assert int(response.headers["RateLimit-Remaining"]) > 0


def test_get_of_an_unknown_prediction_is_404(api):
    status, code, message = error_of(api.get("/api/predictions/nosuchprediction"))
    assert (status, code) == (404, "NOT_FOUND") and "nosuchprediction" in message


def test_a_prediction_id_that_is_not_an_id_never_reaches_replicate(api, fake):
    status, code, _ = error_of(api.get("/api/predictions/has.dots%20and%20spaces"))
    assert (status, code) == (400, "INVALID_REQUEST")
    assert fake.requests == []


def test_cancel_reaches_replicate_and_subscribers_see_canceled(api, api_relay, fake):
    fake.hold = True
    prediction = api.post("/api/predictions", json={"model": QWEN, "input": QWEN_INPUT}).json()
    response = api.post(f"/api/predictions/{prediction['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    assert len(fake.calls("POST", f"/predictions/{prediction['id']}/cancel")) == 1
    messages, code = watch(api_relay, prediction["relay"]["ws"], prediction["relay"]["token"])
    assert code == 1000 and messages[-1]["type"] == "event" and messages[-1]["status"] == "canceled"


def test_list_passes_replicates_cursors_through_as_relay_urls(api, api_relay, fake):
    fake.predictions.clear()
    ids = [
        api.post("/api/predictions", json={"model": QWEN, "input": QWEN_INPUT}).json()["id"] for _ in range(3)
    ]
    first = api.get("/api/predictions").json()
    assert [p["id"] for p in first["results"]] == ids[::-1][:2]
    assert first["previous"] is None
    assert first["next"] == f"{api_relay.url}/api/predictions?cursor=2"
    second = api.get(first["next"]).json()
    assert [p["id"] for p in second["results"]] == ids[:1]
    assert second["next"] is None and second["previous"] == f"{api_relay.url}/api/predictions?cursor=0"
    assert fake.calls("GET", "/predictions")[-1].query == "cursor=2"


@pytest.mark.parametrize(
    "page",
    [{"results": [], "next": 5}, {"results": [], "previous": {"a": 1}}, {"results": "x"}, {"next": None}],
)
@pytest.mark.parametrize("key", [API_KEY, ADMIN_TOKEN])
def test_a_list_answer_that_is_not_a_page_is_a_502_not_a_500(api_relay, fake, page, key):
    """A malformed page from Replicate is UNKNOWN_ERROR in the error shape, for keys and the admin."""
    fake.reset()
    fake.script("GET", "/predictions", Answer(200, body=page))
    with api_client(api_relay, key) as client:
        status, code, _ = error_of(client.get("/api/predictions"))
    assert (status, code) == (502, "UNKNOWN_ERROR")


def test_without_an_upstream_token_the_proxy_answers_503_naming_the_setting(postgres):
    port = free_port()
    env = relay_env(postgres.new_database(), RELAY_API_KEYS=API_KEY)
    with RelayProcess(env, port=port) as relay, api_client(relay) as client:
        for response in [
            client.post("/api/predictions", json={"model": QWEN}),
            client.get("/api/predictions/p1"),
        ]:
            status, code, message = error_of(response)
            assert (status, code) == (503, "PROXY_DISABLED") and "REPLICATE_API_TOKEN" in message
        assert error_of(httpx.get(relay.url + "/api/predictions"))[0] == 401


def test_rate_limit_is_shared_by_two_relay_instances(postgres, fake):
    """Two processes on one database enforce one per-key limit, with RateLimit-* headers."""
    fake.reset()
    dsn = postgres.new_database()
    with (
        relay_for(dsn, fake, RELAY_API_RATE_LIMIT="3") as one,
        relay_for(dsn, fake, RELAY_API_RATE_LIMIT="3") as two,
    ):
        with api_client(one) as a, api_client(two) as b:
            remaining = [int(c.get("/api/predictions").headers["RateLimit-Remaining"]) for c in (a, b, a)]
            assert remaining == [2, 1, 0]
            refused = b.get("/api/predictions")
            assert error_of(refused)[:2] == (429, "RATE_LIMIT_ERROR")
            assert refused.headers["RateLimit-Limit"] == "3" and refused.headers["RateLimit-Remaining"] == "0"
            reset = int(refused.headers["RateLimit-Reset"])
            assert 0 < reset <= 3600 and refused.headers["Retry-After"] == str(reset)
        with api_client(two, OTHER_API_KEY) as other:
            assert other.get("/api/predictions").status_code == 200
    assert len(fake.calls("GET", "/predictions")) == 4


def test_a_body_past_the_api_limit_is_413_naming_relay_api_max_body(api, fake):
    """The /api limit is RELAY_API_MAX_BODY (the webhook one, RELAY_MAX_BODY, is another)."""
    big = {"model": QWEN, "input": {**QWEN_INPUT, "prompt": "x" * 70_000}}
    status, code, message = error_of(api.post("/api/predictions", json=big))
    assert (status, code) == (413, "BODY_TOO_LARGE") and "RELAY_API_MAX_BODY" in message
    assert "RELAY_MAX_BODY " not in message and fake.requests == []


# Found while fuzzing the OpenAPI description (tests/test_openapi.py): each was a 500 or a refusal
# of what the document promises to accept.
def test_nan_and_infinity_are_not_json_and_are_refused(api, fake):
    """Python reads NaN; JSON (and the cache's canonical form) has none: 400, never a 500."""
    for constant in ("NaN", "Infinity", "-Infinity"):
        body = f'{{"model": "someone/other", "input": {{"x": {constant}}}, "cache": true}}'
        status, code, message = error_of(api.post("/api/predictions", content=body))
        assert (status, code) == (400, "INVALID_REQUEST") and "NaN" in message
    assert fake.requests == []


@pytest.mark.parametrize("number", ["1e999", "-1e999", "1.5e400"])
@pytest.mark.parametrize("cache", ["true", "false"])
def test_a_number_past_the_float_range_is_a_400_not_a_500(api, fake, number, cache):
    """`1e999` parses to infinity, which neither Replicate's request nor the cache can carry: 400."""
    body = f'{{"model": "someone/other", "input": {{"x": {number}}}, "cache": {cache}}}'
    status, code, message = error_of(api.post("/api/predictions", content=body))
    assert (status, code) == (400, "INVALID_REQUEST") and "1.8e308" in message
    assert fake.requests == []


def nested_input(depth: int) -> str:
    """An input object whose arrays/objects nest `depth` levels (the object itself is one)."""
    return '{"x": ' + "[" * (depth - 1) + "1" + "]" * (depth - 1) + "}"


def test_an_input_nested_past_what_ingest_takes_is_refused_before_replicate_runs_it(api, fake):
    """Deliveries nest the input one level down and ingest refuses past 128 levels, so a deeper
    input would run (and bill) upstream while every webhook of it was refused: 400 up front."""
    body = '{"model": "someone/other", "input": ' + nested_input(128) + "}"
    status, code, message = error_of(api.post("/api/predictions", content=body))
    assert (status, code) == (400, "INVALID_REQUEST") and "127 levels" in message
    assert fake.requests == []


def test_an_input_nested_to_the_limit_is_created_and_watched_to_its_end(api, api_relay, fake):
    """At 127 levels the create goes through and every delivery of it lands in the log."""
    body = '{"model": "someone/other", "input": ' + nested_input(127) + "}"
    response = api.post("/api/predictions", content=body)
    assert response.status_code == 201, response.text
    relay_block = response.json()["relay"]
    messages, code = watch(api_relay, relay_block["ws"], relay_block["token"])
    assert code == 1000 and messages[-1]["status"] == "succeeded"


@pytest.mark.parametrize(
    "named",
    [{"version": QWEN}, {"version": f"{QWEN}:{VERSION}"}, {"version": VERSION}, {"model": QWEN}],
)
def test_a_trailing_newline_in_a_model_or_version_is_refused_not_a_way_past_the_checks(api, fake, named):
    """`$` matches before a final newline: "qwen/qwen-image-edit-plus\n" named no known model, so
    its input went unchecked (or, as `model`, answered 500). Every form is matched whole: 400."""
    field, value = next(iter(named.items()))
    body = {field: value + "\n", "input": {**QWEN_INPUT, "num_outputs": 9}}
    status, code, message = error_of(api.post("/api/predictions", json=body))
    assert (status, code) == (400, "INVALID_REQUEST") and field in message
    assert fake.requests == []
    assert mapping_in({"version": VERSION, "model": QWEN + "\n"}) is None  # never learned either


@pytest.mark.parametrize("url", ["https://[::1/a.png", "https://host:8]0/a.png"])
def test_an_image_url_with_an_unbalanced_bracket_is_a_400(api, fake, url):
    values = {**QWEN_INPUT, "image": [url]}
    status, code, message = error_of(api.post("/api/predictions", json={"model": QWEN, "input": values}))
    assert (status, code) == (400, "INVALID_REQUEST") and "input.image" in message
    assert fake.requests == []


def test_a_whole_number_written_with_a_fraction_is_an_integer(api, fake):
    """JSON has one number type: 4.0 is 4 (JSON Schema's "integer" agrees); 4.5 is refused above."""
    values = {**QWEN_INPUT, "num_outputs": 4.0, "seed": 7.0}
    assert api.post("/api/predictions", json={"model": QWEN, "input": values}).status_code == 201
