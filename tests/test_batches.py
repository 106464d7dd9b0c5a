"""Batches: at most `concurrency` unfinished upstream, driven by webhooks, each item created once."""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from service.core.auth import mint_token
from service.upstream.ratelimit import key_hash

from .batch_support import (
    CREATES,
    batch_of,
    creates,
    qwen_inputs,
    relay_cli,
    submit,
    wait_for,
    wait_until_ended,
)
from .fake_replicate import (
    API_KEY,
    OTHER_API_KEY,
    QWEN,
    VERSION,
    Answer,
    FakeReplicate,
    api_client,
    api_env,
    error_of,
    relay_for,
    watch,
)
from .support import (
    ADMIN_TOKEN,
    ROOT,
    SUBSCRIBE_KEY,
    RelayProcess,
    free_port,
    query,
    relay_env,
    relay_on_terminal,
)

FAST_RECONCILE = {"RELAY_RECONCILE_INTERVAL": "1", "RELAY_RECONCILE_AFTER": "1"}


@pytest.fixture(scope="module")
def batch_relay(postgres, fake) -> Iterator[RelayProcess]:
    with relay_for(postgres.new_database(), fake, **FAST_RECONCILE) as process:
        yield process


@pytest.fixture
def api(batch_relay: RelayProcess, fake: FakeReplicate) -> Iterator[httpx.Client]:
    fake.reset()
    with api_client(batch_relay) as http:
        yield http


def watch_in_background(relay: RelayProcess, links: dict) -> tuple[threading.Thread, dict]:
    seen: dict = {}

    def run() -> None:
        seen["messages"], seen["code"] = watch(relay, links["ws"], links["token"], timeout=60)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, seen


def test_forty_items_four_at_a_time_all_end_and_the_socket_sees_them(api, batch_relay, fake):
    """Replicate never has more than 4 unfinished; 40 creates; the stream has every item's end, then 1000."""
    batch = submit(api, 40, 4)
    assert batch["status"] == "running" and batch["total"] == 40 and batch["concurrency"] == 4
    thread, seen = watch_in_background(batch_relay, batch["relay"])
    ended = wait_until_ended(api, batch["id"])
    thread.join(30)
    assert ended["status"] == "succeeded" and ended["counts"] == {"succeeded": 40}
    assert fake.max_unfinished <= 4
    assert len(creates(fake)) == 40
    items = ended["items"]
    assert [item["index"] for item in items] == list(range(40))
    assert all(item["output"] and item["status"] == "succeeded" for item in items)
    prompts = [fake.predictions[item["prediction_id"]]["input"]["prompt"] for item in items]
    assert prompts == [f"make {i} blue" for i in range(40)]  # each item got its own input
    assert seen["code"] == 1000
    events = [m for m in seen["messages"] if m["type"] == "event"]
    ends = collections.Counter(m["prediction_id"] for m in events if m["status"] == "succeeded")
    assert set(ends) == {item["prediction_id"] for item in items} and set(ends.values()) == {1}
    seqs = [m["seq"] for m in events]
    assert seqs == sorted(set(seqs))  # no duplicate, in order
    assert any(m["type"] == "caught_up" for m in seen["messages"])


def test_an_invalid_item_refuses_the_batch_with_zero_upstream_calls(api, batch_relay, fake):
    count = "SELECT count(*) AS n FROM batch_items"
    before = query(batch_relay.env["DATABASE_URL"], count)[0]["n"]
    inputs = qwen_inputs(5)
    inputs[3] = {"image": ["http://example.com/not-https.png"], "prompt": "x"}
    response = api.post("/api/batches", json={"model": QWEN, "inputs": inputs})
    status, code, message = error_of(response)
    assert (status, code) == (400, "INVALID_REQUEST")
    assert message.startswith("inputs[3]: input.image")
    assert fake.requests == []
    assert query(batch_relay.env["DATABASE_URL"], count)[0]["n"] == before


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"model": QWEN, "inputs": []}, "inputs must be a non-empty list"),
        ({"model": QWEN, "inputs": "x"}, "inputs must be a non-empty list"),
        ({"model": QWEN, "inputs": [{}] * 10_001}, "at most 10000"),
        (
            {"model": QWEN, "inputs": qwen_inputs(1), "concurrency": 0},
            "concurrency must be an integer from 1 to 50",
        ),
        ({"model": QWEN, "inputs": qwen_inputs(1), "concurrency": 51}, "concurrency must be"),
        ({"model": QWEN, "inputs": qwen_inputs(1), "concurrency": True}, "concurrency must be"),
        ({"model": QWEN, "inputs": qwen_inputs(1), "concurrency": "5"}, "concurrency must be"),
        ({"model": QWEN, "inputs": qwen_inputs(1), "webhook": "https://x"}, "unknown field(s) ['webhook']"),
        ({"inputs": qwen_inputs(1)}, "give exactly one of version"),
        ({"model": QWEN, "inputs": [*qwen_inputs(2), "nope"]}, "inputs[2]: input must be a JSON object"),
        ({"model": QWEN, "inputs": [{"image": ["https://x/y.png"]}]}, "inputs[0]: input.prompt is required"),
        ([1, 2], "the body must be a JSON object"),
        # Found by the OpenAPI fuzzer (tests/test_openapi.py): items are stored as jsonb, which
        # holds neither, and these were 500s.
        ({"model": "a/b", "inputs": [{"p": "x\u0000y"}]}, "inputs[0]: input holds a NUL character"),
        ({"model": "a/b", "inputs": [{}, {"k\u0000": 1}]}, "inputs[1]: input holds a NUL character"),
        ({"model": "a/b", "inputs": [{"p": ["\ud800"]}]}, "inputs[0]: input holds an unpaired UTF-16"),
    ],
)
def test_bad_batches_are_refused_and_nothing_is_created(api, fake, body, expected):
    # json.dumps escapes an unpaired surrogate as JSON allows (\ud800); httpx's json= cannot encode it.
    response = api.post(
        "/api/batches", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    status, code, message = error_of(response)
    assert (status, code) == (400, "INVALID_REQUEST") and expected in message, message
    assert fake.requests == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"model": "a/b", "inputs": [{"p": 1}, {"p": NaN}]}', "inputs[1]: input.p is NaN or Infinity"),
        ('{"model": "a/b", "inputs": [{"p": [1, -Infinity]}]}', "inputs[0]: input.p[1] is NaN or Infinity"),
        ('{"model": "a/b", "inputs": [{}, {}, {"p": {"q": 1e999}}]}', "inputs[2]: input.p.q is NaN or"),
    ],
)
def test_an_input_holding_nan_or_infinity_is_refused_by_its_index(api, batch_relay, fake, raw, expected):
    """Python clients send NaN and Infinity (json.dumps does); the 400 names the item and field."""
    count = "SELECT count(*) AS n FROM batches"
    before = query(batch_relay.env["DATABASE_URL"], count)[0]["n"]
    response = api.post("/api/batches", content=raw, headers={"content-type": "application/json"})
    status, code, message = error_of(response)
    assert (status, code) == (400, "INVALID_REQUEST") and message.startswith(expected), message
    assert fake.requests == []
    assert query(batch_relay.env["DATABASE_URL"], count)[0]["n"] == before


def test_a_bare_version_id_relay_has_learned_is_checked_like_its_model(api, batch_relay, fake):
    """Items are checked with the rules of a single create: a bare version id Relay has learned
    (from an answer naming qwen) gets qwen's rules, so a bad item refuses the batch."""
    assert api.post("/api/predictions", json={"model": QWEN, "input": qwen_inputs(1)[0]}).status_code == 201
    single = api.post("/api/predictions", json={"version": VERSION, "input": {"image": ["https://x/y.png"]}})
    assert error_of(single)[2] == "input.prompt is required for qwen/qwen-image-edit-plus"
    calls = len(fake.requests)
    inputs = [*qwen_inputs(2), {"image": ["https://x/y.png"]}]
    for version in (VERSION, f"someone/other:{VERSION}"):  # the id under another name is still qwen's
        status, code, message = error_of(
            api.post("/api/batches", json={"version": version, "inputs": inputs})
        )
        assert (status, code) == (400, "INVALID_REQUEST") and message.startswith("inputs[2]: input.prompt"), (
            message
        )
    assert len(fake.requests) == calls


def test_a_filter_without_completed_still_asks_for_completed(api, fake):
    """An item's end starts the next: each create asks for `completed` too, or every item would
    wait minutes for reconcile to see it end."""
    batch = submit(api, 3, 1, webhook_events_filter=["start"])
    ended = wait_until_ended(api, batch["id"])
    assert ended["counts"] == {"succeeded": 3}
    assert [c["webhook_events_filter"] for c in creates(fake)] == [["start", "completed"]] * 3


def test_a_body_past_the_batch_limit_is_413_naming_that_limit(api, fake):
    """The 413 names the batch body limit, not RELAY_MAX_BODY (the webhooks', which does not govern it)."""
    inputs = [{"prompt": "x" * 2000}] * 8400  # just over 16 MiB
    response = api.post("/api/batches", content=json.dumps({"model": "a/b", "inputs": inputs}))
    status, code, message = error_of(response)
    assert (status, code) == (413, "BODY_TOO_LARGE") and "the batch body limit allows 16777216" in message, (
        message
    )
    assert "RELAY_MAX_BODY" not in message and fake.requests == []


def test_a_body_that_is_not_json_is_refused(api):
    response = api.post("/api/batches", content=b"{nope", headers={"content-type": "application/json"})
    assert error_of(response)[:2] == (400, "INVALID_REQUEST")


def test_unknown_and_foreign_batches_are_404_and_cancel_twice_is_409(api, batch_relay, fake):
    """Another key gets 404 (no data, no cancel) and an empty list; the admin sees every batch."""
    fake.hold = True
    batch = submit(api, 3, 1)
    for unknown in ("b_" + "0" * 32, "nope", "%F0%9F%98%80"):
        assert error_of(api.get(f"/api/batches/{unknown}"))[:2] == (404, "NOT_FOUND")
        assert error_of(api.post(f"/api/batches/{unknown}/cancel"))[:2] == (404, "NOT_FOUND")
    # NUL in a path is a parameter no id can match: 400 on every route (DESIGN; app.refuse_nul_path)
    assert error_of(api.get("/api/batches/b_%00"))[:2] == (400, "INVALID_REQUEST")
    with api_client(batch_relay, OTHER_API_KEY) as other:
        assert other.get(f"/api/batches/{batch['id']}").status_code == 404
        assert other.post(f"/api/batches/{batch['id']}/cancel").status_code == 404
        assert batch["id"] not in [b["id"] for b in other.get("/api/batches").json()["batches"]]
    with api_client(batch_relay, ADMIN_TOKEN) as admin:
        assert admin.get(f"/api/batches/{batch['id']}").status_code == 200
    first = api.post(f"/api/batches/{batch['id']}/cancel")
    assert first.status_code == 202 and first.json()["cancel_requested"] is True
    status, code, message = error_of(api.post(f"/api/batches/{batch['id']}/cancel"))
    assert (status, code) == (409, "CONFLICT") and "already canceled" in message
    wait_until_ended(api, batch["id"])


def test_cancel_stops_new_items_and_cancels_the_unfinished_upstream(api, fake):
    fake.hold = True  # predictions run until canceled
    batch = submit(api, 10, 3)
    wait_for(lambda: len(fake.unfinished) == 3, what="3 running predictions")
    response = api.post(f"/api/batches/{batch['id']}/cancel")
    assert response.status_code == 202
    ended = wait_until_ended(api, batch["id"])
    assert ended["status"] == "canceled" and ended["counts"] == {"canceled": 10}
    assert len(creates(fake)) == 3 and len(fake.calls("POST", r"/predictions/[^/]+/cancel")) == 3
    assert [i["prediction_id"] is None for i in ended["items"]] == [False] * 3 + [True] * 7
    assert error_of(api.post(f"/api/batches/{batch['id']}/cancel"))[0] == 409


def test_a_cancel_replicate_fails_to_take_is_sent_again(api, fake):
    """Replicate answers the cancels 500 (past the client's own retries): they are sent again,
    so the predictions stop and the batch ends canceled rather than running on upstream."""
    fake.hold = True  # predictions run until canceled
    batch = submit(api, 5, 2)
    wait_for(lambda: len(fake.unfinished) == 2, what="2 running predictions")
    cancels = r"/predictions/[^/]+/cancel"
    fake.script("POST", cancels, *[Answer(500)] * 6)  # 2 cancels x 3 attempts (RELAY_UPSTREAM_RETRIES=2)
    assert api.post(f"/api/batches/{batch['id']}/cancel").status_code == 202
    ended = wait_until_ended(api, batch["id"])
    assert ended["status"] == "canceled" and ended["counts"] == {"canceled": 5}
    assert len(fake.calls("POST", cancels)) > 6 and not fake.unfinished


def test_a_429_storm_slows_the_batch_and_loses_nothing(api, fake):
    """Creates answered 429 are retried after Retry-After; each item is created exactly once."""
    fake.script("POST", CREATES, *[Answer(429, {"Retry-After": "1"}) for _ in range(8)])
    batch = submit(api, 8, 3)
    ended = wait_until_ended(api, batch["id"], timeout=60)
    assert ended["counts"] == {"succeeded": 8}
    accepted = creates(fake)
    assert len(accepted) == 8 and len({c["webhook"] for c in accepted}) == 8
    assert len(fake.calls("POST", CREATES)) == 16 and fake.max_unfinished <= 3


def test_a_create_replicate_refuses_fails_that_item_and_the_batch_goes_on(api, fake):
    fake.script("POST", CREATES, Answer(422, body={"detail": "input.prompt: too spicy", "status": 422}))
    batch = submit(api, 4, 1)
    ended = wait_until_ended(api, batch["id"])
    assert ended["status"] == "succeeded" and ended["counts"] == {"failed": 1, "succeeded": 3}
    failed = ended["items"][0]
    assert failed["status"] == "failed" and "too spicy" in failed["error"] and failed["prediction_id"] is None


def test_a_lost_final_webhook_is_recovered_by_reconcile(api, batch_relay, fake):
    fake.lose = {"completed"}
    batch = submit(api, 3, 2)
    ended = wait_until_ended(api, batch["id"], timeout=40)
    assert ended["counts"] == {"succeeded": 3} and len(creates(fake)) == 3
    rows = query(
        batch_relay.env["DATABASE_URL"], "SELECT count(*) AS n FROM events WHERE source = 'reconcile'"
    )
    assert rows[0]["n"] >= 3


def test_a_lost_create_answer_is_bound_by_the_items_webhook_and_never_resent(api, fake):
    """The create happened but its answer timed out: the item's own webhook URL finds it."""
    fake.answer_delay = 1.5  # longer than RELAY_UPSTREAM_TIMEOUT (1 s): every answer is lost
    batch = submit(api, 3, 2)
    ended = wait_until_ended(api, batch["id"])
    assert ended["counts"] == {"succeeded": 3}
    assert len(fake.calls("POST", CREATES)) == 3
    assert {i["prediction_id"] for i in ended["items"]} == set(fake.created)


def test_kill_9_between_the_upstream_call_and_its_record_then_restart_creates_each_item_once(postgres, fake):
    """kill -9 while a create's answer is in flight; after a restart: exactly 40 creates."""
    fake.reset()
    fake.retry_final = True  # Replicate resends the final delivery while Relay is down
    dsn, port = postgres.new_database(), free_port()
    env = relay_env(dsn, **api_env(fake, port, **FAST_RECONCILE))
    first = RelayProcess(env, port=port).start()
    try:
        with api_client(first) as api:
            batch = submit(api, 40, 4)
            wait_for(lambda: len(fake.created) >= 12, what="12 creates")
            fake.answer_delay = 3.0
            seen = len(fake.created)
            wait_for(lambda: len(fake.created) > seen, what="a create whose answer is held")
            # Every claimed item's create has reached Replicate (none is still on its way: a
            # create cut off before it was sent is a lost outcome, which waits 10 minutes).
            wait_for(lambda: len(fake.created) - seen >= claimed(dsn), what="every claim sent")
            first.stop(signal.SIGKILL)
    finally:
        first.stop()
    fake.answer_delay = 0.0
    with RelayProcess(env, port=port) as second, api_client(second) as api:
        ended = wait_until_ended(api, batch["id"], timeout=90)
    assert ended["counts"] == {"succeeded": 40}
    assert len(fake.calls("POST", CREATES)) == 40 and len(fake.created) == 40
    assert fake.max_unfinished <= 4


def claimed(dsn: str) -> int:
    """Items whose create is in flight: claimed, their answer not recorded yet."""
    return int(query(dsn, "SELECT count(*) FROM batch_items WHERE status = 'creating'")[0][0])


def test_two_instances_share_one_batch_within_its_concurrency(postgres, fake):
    """Each instance's items report to the other, so both schedule: never above 3, no duplicate."""
    fake.reset()
    dsn, port_a, port_b = postgres.new_database(), free_port(), free_port()
    env_a = relay_env(dsn, **api_env(fake, port_a, RELAY_PUBLIC_URL=f"http://127.0.0.1:{port_b}"))
    env_b = relay_env(dsn, **api_env(fake, port_b, RELAY_PUBLIC_URL=f"http://127.0.0.1:{port_a}"))
    with RelayProcess(env_a, port=port_a) as a, RelayProcess(env_b, port=port_b), api_client(a) as api:
        batch = submit(api, 30, 3)
        ended = wait_until_ended(api, batch["id"], timeout=60)
    assert ended["counts"] == {"succeeded": 30}
    accepted = creates(fake)
    assert len(fake.calls("POST", CREATES)) == 30 and len({c["webhook"] for c in accepted}) == 30
    assert fake.max_unfinished <= 3
    hosts = collections.Counter(c["webhook"].split("/webhooks")[0] for c in accepted)
    assert len(hosts) == 2, hosts  # both instances created items


def test_a_spent_budget_starts_no_new_item_and_says_so(postgres, fake):
    """The first item's cost passes RELAY_BUDGET: the others wait, and the batch says why."""
    fake.reset()
    fake.hold = True
    prices = {"RELAY_PRICES": f"{QWEN}=1000", "RELAY_BUDGET": "1", "RELAY_BUDGET_INTERVAL": "1"}
    with relay_for(postgres.new_database(), fake, **prices) as relay, api_client(relay) as api:
        batch = submit(api, 3, 1)
        wait_for(lambda: len(fake.created) == 1, what="the first create")
        threading.Event().wait(1.2)  # the spend read before it is stale now
        fake.hold = False
        wait_for(lambda: (batch_of(api, batch["id"])["held"] or {}).get("reason"), what="a budget hold")
        held = batch_of(api, batch["id"])
    assert held["status"] == "running" and "RELAY_BUDGET reached" in held["held"]["reason"]
    assert held["counts"] == {"succeeded": 1, "pending": 2} and len(creates(fake)) == 1


def test_items_page_with_after_and_limit(api, fake):
    batch = submit(api, 5, 5)
    wait_until_ended(api, batch["id"])
    page = api.get(f"/api/batches/{batch['id']}", params={"limit": 2}).json()
    assert [i["index"] for i in page["items"]] == [0, 1] and page["next_after"] == 1
    page = api.get(f"/api/batches/{batch['id']}", params={"after": 3, "limit": 2}).json()
    assert [i["index"] for i in page["items"]] == [4] and page["next_after"] is None
    for bad in ({"limit": 0}, {"limit": 1001}, {"after": -1}, {"after": 2**70}, {"after": "x"}):
        assert error_of(api.get(f"/api/batches/{batch['id']}", params=bad))[:2] == (400, "INVALID_REQUEST")


# ---- relay batch submit | status ---------------------------------------------------------------


def jsonl(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "inputs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_batch_submit_draws_a_bar_and_exits_0_when_all_succeeded(api, batch_relay, fake, tmp_path):
    lines = [json.dumps(values) for values in qwen_inputs(6)]
    file = jsonl(tmp_path, [*lines[:3], "", *lines[3:]])  # a blank line is skipped
    done, terminal = relay_on_terminal(
        "batch", "submit", file, "--model", QWEN, "--concurrency", "2", env=batch_relay.env
    )
    assert done.returncode == 0, (done.stdout, terminal)
    first, last = done.stdout.strip().splitlines()
    assert first.startswith("batch b_") and first.endswith(": 6 item(s), 2 at a time")
    assert "succeeded: 6 item(s), 6 succeeded in " in last
    assert b"items:" in terminal and b"6/6" in terminal and b"/s)" in terminal
    assert len(creates(fake)) == 6 and fake.max_unfinished <= 2
    batch_id = first.split()[1].rstrip(":")
    status = relay_cli("batch", "status", batch_id, env=batch_relay.env)
    assert status.returncode == 0 and status.stdout == f"batch {batch_id} succeeded: 6 item(s), 6 succeeded\n"


def test_batch_submit_exits_1_with_a_summary_when_an_item_failed(api, batch_relay, fake, tmp_path):
    fake.script("POST", CREATES, Answer(422, body={"detail": "nope", "status": 422}))
    file = jsonl(tmp_path, [json.dumps(values) for values in qwen_inputs(2)])
    done = relay_cli("batch", "submit", file, "--model", QWEN, env=batch_relay.env)
    assert done.returncode == 1 and "2 item(s), 1 failed, 1 succeeded in " in done.stdout
    assert done.stderr == ""  # no bar when stderr is not a terminal


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "a"}', '{"prompt": ', '{"prompt": "c"}'], "line 2 is not valid JSON"),
        (['{"prompt": "a"}', "", "[1]"], "line 3 is not a JSON object"),
        (
            [json.dumps(qwen_inputs(1)[0]), "", '{"image": ["https://x/y.png"]}'],
            "line 3: input.prompt is required",
        ),
        # Python's json reads these, but they are not JSON: no traceback, the line named.
        (['{"prompt": "a"}', '{"prompt": "b", "seed": NaN}'], "line 2 is not valid JSON"),
        (['{"prompt": "a"}', '{"prompt": "b", "guidance": 1e999}'], "line 2 is not valid JSON"),
        (['{"prompt": "a"}', '{"prompt": "b\\ud800"}'], "line 2 is not valid JSON"),
        (['{"prompt": "a"}', "[" * 100_000], "line 2 is not valid JSON"),
    ],
)
def test_batch_submit_names_the_bad_line_and_creates_nothing(
    api, batch_relay, fake, tmp_path, lines, message
):
    done = relay_cli("batch", "submit", jsonl(tmp_path, lines), "--model", QWEN, env=batch_relay.env)
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert fake.requests == []


def submitted_then_relay_stopped(
    postgres, fake, tmp_path, items: int
) -> tuple[subprocess.Popen, dict[str, str], int]:
    """`relay batch submit` of `items` held items, started against a Relay that is then stopped
    once every item was created: the command, and the env and port to start Relay again on."""
    fake.reset()
    fake.hold = True  # the predictions run until released
    dsn, port = postgres.new_database(), free_port()
    env = relay_env(dsn, **api_env(fake, port))
    file = jsonl(tmp_path, [json.dumps(values) for values in qwen_inputs(items)])
    command = [sys.executable, "-m", "service", "batch", "submit", file, "--model", QWEN, "--quiet"]
    with RelayProcess(env, port=port):
        cli = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        wait_for(lambda: len(fake.created) == items, what="every create")
    return cli, env, port


def test_batch_submit_follows_its_batch_across_a_relay_restart(postgres, fake, tmp_path):
    """Relay restarted mid-batch (a deploy): `relay batch submit` reconnects and follows the batch
    until every item ended, then exits 0, instead of giving up when its socket closed."""
    cli, env, port = submitted_then_relay_stopped(postgres, fake, tmp_path, 2)
    try:
        with RelayProcess(env, port=port):
            fake.hold = False
            out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, (out, err)
    assert (
        out.strip().splitlines()[-1].endswith(" 2 item(s), 2 succeeded in " + out.split(" in ")[-1].strip())
    )
    assert len(creates(fake)) == 2


def test_batch_submit_stops_with_one_line_when_relay_refuses_its_stream(postgres, fake, tmp_path):
    """After a restart with another RELAY_SUBSCRIBE_KEY the batch's token is refused (403):
    asking again cannot help, so the command stops at once with one line, exit 2."""
    cli, env, port = submitted_then_relay_stopped(postgres, fake, tmp_path, 1)
    try:
        with RelayProcess({**env, "RELAY_SUBSCRIBE_KEY": "another-subscribe-key-" + "z" * 20}, port=port):
            out, err = cli.communicate(timeout=30)
    finally:
        fake.hold = False
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 2, (out, err)
    assert err.startswith("relay: error: Relay refused the stream of batch b_") and err.endswith(
        "(HTTP 403)\n"
    )


def test_batch_status_of_an_unknown_batch_is_one_line(batch_relay):
    done = relay_cli("batch", "status", "b_" + "0" * 32, env=batch_relay.env)
    assert (
        done.returncode == 2
        and done.stderr.startswith("relay: error: Relay answered 404")
        and "no batch" in done.stderr
    )


@pytest.mark.parametrize("batch_id", ["../predictions", "", "b_x?limit=0", "nope"])
def test_batch_status_of_something_that_is_no_batch_id_is_one_line(batch_relay, batch_id):
    """It would go into the URL's path: `../predictions` reached another route (a traceback)."""
    done = relay_cli("batch", "status", batch_id, env=batch_relay.env)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr == f"relay: error: {batch_id!r} is not a batch id (b_ and 32 hex digits)\n"


OWNERS_TABLE = """CREATE TABLE IF NOT EXISTS prediction_owners (
    prediction_id text PRIMARY KEY, owner text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"""


def test_item_predictions_are_owned_by_the_batchs_key_when_prediction_owners_exists(postgres, fake):
    """Recorded from the create's answer, and from the first delivery when the answer was lost."""
    fake.reset()
    dsn = postgres.new_database()
    query(dsn, OWNERS_TABLE)  # sql/050_owners.sql's table (a no-op once that migration is merged)
    with relay_for(dsn, fake) as relay, api_client(relay) as api:
        answered = wait_until_ended(api, submit(api, 2, 2)["id"])
        fake.answer_delay = 1.5  # longer than RELAY_UPSTREAM_TIMEOUT: the answers are lost
        lost = wait_until_ended(api, submit(api, 2, 2)["id"])
    owners = {r["prediction_id"]: r["owner"] for r in query(dsn, "SELECT * FROM prediction_owners")}
    predictions = [i["prediction_id"] for i in answered["items"] + lost["items"]]
    assert owners == dict.fromkeys(predictions, key_hash(API_KEY))


def test_the_batch_socket_takes_only_its_own_batch_token_or_the_admin_token(api, batch_relay, fake):
    """Another batch's token, a prediction token or none: the handshake is refused with 403."""
    first, second = submit(api, 1, 1), submit(api, 1, 1)
    ws = first["relay"]["ws"]
    prediction_token = mint_token(SUBSCRIBE_KEY, "*")
    for token in (second["relay"]["token"], prediction_token, "nope"):
        with pytest.raises(InvalidStatus) as refused, connect(f"{ws}?token={token}", open_timeout=10):
            pass
        assert refused.value.response.status_code == 403
    messages, code = watch(batch_relay, ws, ADMIN_TOKEN, timeout=30)
    assert code == 1000 and any(m.get("status") == "succeeded" for m in messages)
    wait_until_ended(api, second["id"])
