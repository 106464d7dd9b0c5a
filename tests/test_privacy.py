"""Encryption at rest, erasure and log hygiene, seen through a real `relay serve` and its database."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator

import asyncpg
import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from service.batches.requests import batch_request
from service.batches.store import insert_batch
from service.core import crypto
from service.db import store
from service.db.events import body_bytes
from service.db.vault import Vault
from service.ops.simulate import lifecycle

from .batch_support import qwen_inputs
from .fake_replicate import QWEN, api_client, reconcile_cli, relay_for
from .receiver import RECEIVER_SECRET, Receiver
from .support import (
    ADMIN_TOKEN,
    WEBHOOK_SECRET,
    RelayProcess,
    admin_headers,
    deliver_lifecycle,
    new_prediction_id,
    post_webhook,
    query,
    relay_cli,
    relay_env,
)

KEK_A = bytes(range(32))
KEK_B = bytes(range(100, 132))
KEY_A = base64.b64encode(KEK_A).decode()
KEY_B = base64.b64encode(KEK_B).decode()
PROMPT = "Paint my neighbour Zebulon Quackenbush as a pirate"
IMAGE_URL = "https://example.com/private/zebulon-selfie-7f3a.png"


class Sealed:
    """A relay with encryption on, its database, and clients for it."""

    def __init__(self, dsn: str, process: RelayProcess):
        self.dsn, self.process = dsn, process
        self.http = httpx.Client(base_url=process.url, timeout=30)
        self.admin = httpx.Client(base_url=process.url, timeout=30, headers=admin_headers())

    def query(self, sql: str, *args: object) -> list[asyncpg.Record]:
        return query(self.dsn, sql, *args)

    def events(self, prediction_id: str) -> list[dict]:
        response = self.admin.get(f"/predictions/{prediction_id}/events")
        assert response.status_code == 200, response.text
        return response.json()["events"]


@pytest.fixture(scope="module")
def sealed(postgres) -> Iterator[Sealed]:
    dsn = postgres.new_database()
    with RelayProcess(relay_env(dsn, RELAY_ENCRYPTION_KEY=KEY_A)) as process:
        relay = Sealed(dsn, process)
        yield relay
        relay.http.close()
        relay.admin.close()


def personal_lifecycle(prediction_id: str) -> list[dict]:
    bodies = lifecycle(prediction_id)
    for body in bodies:
        body["input"] = {"prompt": PROMPT, "image": [IMAGE_URL], "seed": 8675309}
    return bodies


def deliver(client: httpx.Client, bodies: list[dict | bytes]) -> list[int]:
    seqs = []
    for body in bodies:
        response = post_webhook(client, body)
        assert response.status_code == 200, response.text
        seqs.append(response.json()["seq"])
    return seqs


def ws_messages(relay: RelayProcess, path: str) -> list[dict]:
    """Every message of a stream until the server closes it."""
    url = f"{relay.ws_url}{path}{'&' if '?' in path else '?'}token={ADMIN_TOKEN}"
    with ws_connect(url, open_timeout=10) as socket:
        messages = []
        try:
            while True:
                messages.append(json.loads(socket.recv(timeout=10)))
        except Exception as closed:  # noqa: BLE001 - ConnectionClosedOK ends the stream
            assert "1000" in str(closed), closed
        return messages


def cli_lines(sealed: Sealed, *args: str) -> list[dict]:
    """The JSON lines a CLI reader prints, run with the sealed relay's key."""
    done = relay_cli(*args, env=sealed.process.env)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def to(downstream: Receiver) -> tuple[str, ...]:
    return "--to", f"{downstream.url}/hook", "--secret", RECEIVER_SECRET


def replay(sealed: Sealed, prediction_id: str, *target: str) -> dict:
    [report] = cli_lines(sealed, "replay", "--prediction", prediction_id, "--json", "--quiet", *target)
    assert report["failed"] == [], report
    return report


def test_stored_rows_hold_no_plaintext(sealed):
    """With a key, the log and the keys table hold no prompt, URL or input value in clear."""
    prediction_id = new_prediction_id()
    deliver(sealed.http, personal_lifecycle(prediction_id))
    rows = sealed.query("SELECT body, encrypted FROM events WHERE prediction_id = $1", prediction_id)
    assert len(rows) == 6 and all(row["encrypted"] for row in rows)
    for row in rows:
        for secret in (PROMPT.encode(), IMAGE_URL.encode(), b"Zebulon", b"8675309", b"replicate.delivery"):
            assert secret not in row["body"]
    [key] = sealed.query("SELECT kek_id, wrapped FROM data_keys WHERE prediction_id = $1", prediction_id)
    assert key["kek_id"] == crypto.key_id(KEK_A) and len(key["wrapped"]) == 60
    state = sealed.admin.get(f"/predictions/{prediction_id}").json()
    assert state["status"] == "succeeded" and state["output"][0].endswith("out-0.webp")
    assert sealed.events(prediction_id)[0]["prediction"]["input"]["prompt"] == PROMPT


def test_exact_bytes_round_trip_through_api_and_websocket(sealed):
    """Bodies jsonb would refuse (NUL in a string) come back exactly, decrypted."""
    prediction_id = new_prediction_id()
    raw = [
        json.dumps(body, indent=1).replace('"logs": ""', '"logs": "nul\\u0000here"').encode()
        for body in personal_lifecycle(prediction_id)
    ]
    seqs = deliver(sealed.http, raw)
    expected = [json.loads(body) for body in raw]
    assert expected[0]["logs"] == "nul\x00here"
    assert [e["prediction"] for e in sealed.events(prediction_id)] == expected
    streamed = ws_messages(sealed.process, f"/predictions/{prediction_id}/ws")
    assert [m["prediction"] for m in streamed if m["type"] == "event"] == expected
    assert streamed[-1] == {"type": "caught_up", "seq": streamed[-1]["seq"]}
    rows = sealed.query(f"SELECT {store.EVENT_COLUMNS} FROM events WHERE seq = ANY($1) ORDER BY seq", seqs)
    assert [body_bytes(row, Vault([KEK_A])) for row in rows] == raw


def test_every_reader_decrypts_the_exact_bytes(sealed, receiver):
    """Export, replay (URL and fan-out), `relay events --json` and the dashboard's list read the
    plaintext: the exact bytes received (non-ASCII, an escaped NUL, the sender's whitespace)."""
    prediction_id = new_prediction_id()
    bodies = personal_lifecycle(prediction_id)
    for body in bodies:
        body["input"]["prompt"] = PROMPT + " \u2014 caf\u00e9 \x00"
    raw = [json.dumps(body, indent=1, ensure_ascii=False).encode() for body in bodies]
    last = deliver(sealed.http, raw)[-1]
    webhook_ids = [e["webhook_id"] for e in sealed.events(prediction_id)]

    exported = cli_lines(sealed, "export", "--prediction", prediction_id, "--quiet")
    assert [line["body"].encode() for line in exported] == raw
    listed = relay_cli("events", "--prediction", prediction_id, "--json", env=sealed.process.env)
    assert listed.returncode == 0, listed.stderr
    for text in raw:  # one page, each body spliced in with its own whitespace
        assert f'"prediction":{text.decode()}}}' in listed.stdout
    assert [e["prediction"] for e in json.loads(listed.stdout)["events"]] == bodies
    assert replay(sealed, prediction_id, *to(receiver))["delivered"] == 6
    assert receiver.accepted == list(zip(webhook_ids, raw, strict=True))

    url = f"{sealed.process.ws_url}/events/ws?after={last}&token={ADMIN_TOKEN}"
    with ws_connect(url, open_timeout=10) as subscriber:
        assert json.loads(subscriber.recv(timeout=10))["type"] == "caught_up"
        assert replay(sealed, prediction_id, "--fanout")["delivered"] == 6
        pushed = [json.loads(subscriber.recv(timeout=10)) for _ in raw]
    assert [(m["replayed"], m["prediction"]) for m in pushed] == [(True, body) for body in bodies]

    recent = sealed.admin.get("/admin/predictions", params={"limit": 500}).json()["predictions"]
    [state] = [p for p in recent if p["id"] == prediction_id]
    assert state["output"] == bodies[-1]["output"] and state["logs"] == bodies[-1]["logs"]


def swap_bodies(sealed: Sealed, first: int, second: int) -> None:
    """What an attacker or a bad restore could do: move ciphertexts between two rows."""
    sealed.query(
        "DO $$ BEGIN"
        " ALTER TABLE events DISABLE TRIGGER events_no_update_delete;"
        f" UPDATE events SET body = CASE seq WHEN {first} THEN (SELECT body FROM events WHERE seq = {second})"
        f"  ELSE (SELECT body FROM events WHERE seq = {first}) END WHERE seq IN ({first}, {second});"
        " ALTER TABLE events ENABLE TRIGGER events_no_update_delete;"
        " END $$"
    )


def test_swapped_ciphertexts_are_detected_not_shown(sealed):
    """A ciphertext moved to another row reads as unreadable, never as the other row's data."""
    mine, other = new_prediction_id(), new_prediction_id()
    seqs = deliver(sealed.http, personal_lifecycle(mine))
    other_seqs = deliver(sealed.http, personal_lifecycle(other))
    swap_bodies(sealed, seqs[1], seqs[2])  # same prediction, same data key
    swap_bodies(sealed, seqs[3], other_seqs[3])  # across predictions
    contents = [e["prediction"] for e in sealed.events(mine)]
    assert contents[1] == contents[2] == contents[3] == {"unreadable": True}
    assert contents[0]["id"] == contents[4]["id"] == mine
    assert [e["prediction"] for e in sealed.events(other)][3] == {"unreadable": True}
    streamed = ws_messages(sealed.process, f"/predictions/{mine}/ws")
    assert [m.get("prediction") for m in streamed[1:4]] == [{"unreadable": True}] * 3


def test_erasure_keeps_seq_status_and_times_and_hides_content_everywhere(sealed, receiver):
    """API, live and backlog streams, export and replay all show seq/status/times, content erased."""
    prediction_id, bystander = new_prediction_id(), new_prediction_id()
    deliver(sealed.http, personal_lifecycle(prediction_id))
    last = deliver(sealed.http, personal_lifecycle(bystander))[-1]
    before = sealed.events(prediction_id)
    url = f"{sealed.process.ws_url}/events/ws?after={last}&token={ADMIN_TOKEN}"
    with ws_connect(url, open_timeout=10) as live:
        assert json.loads(live.recv(timeout=10))["type"] == "caught_up"
        response = sealed.admin.delete(f"/admin/predictions/{prediction_id}")
        assert response.status_code == 200, response.text
        erasure_seq = response.json()["seq"]
        assert response.json() == {
            "id": prediction_id,
            "erased": True,
            "seq": erasure_seq,
            "already_erased": False,
        }
        pushed = json.loads(live.recv(timeout=10))
    assert pushed["seq"] == erasure_seq and pushed["source"] == "erasure"
    assert pushed["prediction"] == {"erased": True} and pushed["prediction_id"] == prediction_id

    after = sealed.events(prediction_id)
    keep = ("seq", "status", "received_at", "webhook_id", "source")
    assert [{k: e[k] for k in keep} for e in after[:-1]] == [{k: e[k] for k in keep} for e in before]
    assert all(e["prediction"] == {"erased": True} for e in after)
    assert [e["source"] for e in after].count("erasure") == 1 and after[-1]["seq"] == erasure_seq
    state = sealed.admin.get(f"/predictions/{prediction_id}").json()
    assert state["status"] == "succeeded" and state["erased"] is True and state["output"] is None
    assert state["last_seq"] == erasure_seq and state["event_count"] == len(before) + 1
    streamed = ws_messages(sealed.process, f"/predictions/{prediction_id}/ws")
    assert [m["prediction"] for m in streamed if m["type"] == "event"] == [{"erased": True}] * len(after)
    assert sealed.query("SELECT 1 FROM data_keys WHERE prediction_id = $1", prediction_id) == []
    assert sealed.events(bystander)[0]["prediction"]["input"]["prompt"] == PROMPT

    exported = cli_lines(sealed, "export", "--prediction", prediction_id, "--quiet")
    assert [json.loads(line.pop("body")) for line in exported] == [{"erased": True}] * len(after)
    assert [{k: line[k] for k in keep} for line in exported] == [{k: e[k] for k in keep} for e in after]
    assert replay(sealed, prediction_id, *to(receiver))["delivered"] == len(after)
    assert receiver.accepted == [(e["webhook_id"], b'{"erased":true}') for e in after]


def test_forgetting_twice_is_harmless_and_late_deliveries_stay_forgotten(sealed):
    prediction_id = new_prediction_id()
    bodies = personal_lifecycle(prediction_id)
    deliver(sealed.http, bodies[:2])
    first = sealed.admin.delete(f"/admin/predictions/{prediction_id}").json()
    second = sealed.admin.delete(f"/admin/predictions/{prediction_id}")
    assert second.status_code == 200
    assert second.json() == {**first, "already_erased": True}
    deliver(sealed.http, bodies[2:])  # Replicate keeps sending after the user asked to be forgotten
    events = sealed.events(prediction_id)
    assert [e["source"] for e in events].count("erasure") == 1
    assert [e["status"] for e in events][-1] == "succeeded"
    assert all(e["prediction"] == {"erased": True} for e in events)
    assert sealed.query("SELECT 1 FROM data_keys WHERE prediction_id = $1", prediction_id) == []
    rows = sealed.query("SELECT body FROM events WHERE prediction_id = $1", prediction_id)
    assert not any(PROMPT.encode() in row["body"] for row in rows)


def test_forgetting_needs_the_admin_token_and_a_known_prediction(sealed):
    prediction_id = new_prediction_id()
    deliver(sealed.http, personal_lifecycle(prediction_id)[:1])
    assert sealed.http.delete(f"/admin/predictions/{prediction_id}").status_code == 401
    forged = sealed.http.delete(
        f"/admin/predictions/{prediction_id}", headers={"Authorization": "Bearer nope"}
    )
    assert forged.status_code == 403
    missing = sealed.admin.delete("/admin/predictions/never-seen")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
    assert sealed.events(prediction_id)[0]["prediction"]["input"]["prompt"] == PROMPT


def test_relay_forget_command(sealed):
    first, second = new_prediction_id(), new_prediction_id()
    deliver(sealed.http, personal_lifecycle(first) + personal_lifecycle(second))
    env = sealed.process.env
    result = relay_cli("forget", first, second, "never-seen", env=env)
    assert result.returncode == 2, result.stderr
    assert (
        f"{first}: forgotten (erasure event seq" in result.stdout and f"{second}: forgotten" in result.stdout
    )
    assert (
        result.stderr.strip()
        == "relay: cannot forget never-seen: no events stored for prediction 'never-seen'"
    )
    again = relay_cli("forget", first, env=env)
    assert again.returncode == 0 and f"{first}: was already forgotten" in again.stdout
    assert sealed.admin.get(f"/predictions/{first}").json()["erased"] is True
    assert sealed.events(second)[-1]["source"] == "erasure"


def test_forgetting_is_refused_without_encryption(postgres):
    """Nothing can be erased from a clear-text append-only log: refused, and nothing is appended."""
    dsn = postgres.new_database()
    prediction_id = new_prediction_id()
    with RelayProcess(relay_env(dsn)) as plain, httpx.Client(base_url=plain.url, timeout=30) as http:
        deliver_lifecycle(http, prediction_id)
        refused = http.delete(f"/admin/predictions/{prediction_id}", headers=admin_headers())
        count = http.get(f"/predictions/{prediction_id}", headers=admin_headers()).json()["event_count"]
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "ENCRYPTION_OFF"
    assert "RELAY_ENCRYPTION_KEY is not set" in refused.json()["error"]["message"] and count == 6
    result = relay_cli("forget", prediction_id, env=relay_env(dsn))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "nothing can be erased" in result.stderr
    clear = relay_cli("forget", prediction_id, env=relay_env(dsn, RELAY_ENCRYPTION_KEY=KEY_A))
    assert clear.returncode == 2 and "stored in clear" in clear.stderr


def one_line_refusal(dsn: str, **extra: str) -> str:
    result = relay_cli("serve", env=relay_env(dsn, **extra))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize(
    ("key", "refusal"),
    [(None, "RELAY_ENCRYPTION_KEY is not set"), (KEY_B, f"lacks key-encryption key {crypto.key_id(KEK_A)}")],
    ids=["no key", "wrong key"],
)
def test_cli_readers_refuse_a_missing_or_wrong_key(sealed, receiver, tmp_path, key, refusal):
    """events, export and replay stop with one line before reading: no file of unreadable
    bodies, nothing sent under the original webhook ids."""
    prediction_id = new_prediction_id()
    deliver(sealed.http, personal_lifecycle(prediction_id))
    env = {k: v for k, v in sealed.process.env.items() if k != "RELAY_ENCRYPTION_KEY"}
    if key is not None:
        env["RELAY_ENCRYPTION_KEY"] = key
    target = tmp_path / "export.jsonl"
    for command in (
        ("events", "--json"),
        ("export", "-o", str(target)),
        ("replay", *to(receiver)),
        ("replay", "--fanout"),
    ):
        result = relay_cli(*command, "--prediction", prediction_id, env=env)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.count("\n") == 1 and refusal in result.stderr, result.stderr
        assert result.stdout == "" and "Traceback" not in result.stderr
    assert not target.exists() and receiver.attempts == []


async def waiting_batch(dsn: str, items: int) -> None:
    request = batch_request(
        {"model": QWEN, "inputs": qwen_inputs(items)}, "http://127.0.0.1:9/webhooks/replicate"
    )
    conn = await asyncpg.connect(dsn)
    try:
        await insert_batch(conn, "admin", request, Vault([KEK_A]))
    finally:
        await conn.close()


def test_rotation_then_restart_with_only_the_new_key_reads_everything(postgres):
    dsn = postgres.new_database()
    predictions = [new_prediction_id() for _ in range(3)]
    with (
        RelayProcess(relay_env(dsn, RELAY_ENCRYPTION_KEY=KEY_A)) as old,
        httpx.Client(base_url=old.url, timeout=30) as http,
    ):
        for prediction_id in predictions:
            deliver(http, personal_lifecycle(prediction_id))
    assert "RELAY_ENCRYPTION_KEY is not set" in one_line_refusal(dsn)
    wrong = one_line_refusal(dsn, RELAY_ENCRYPTION_KEY=KEY_B)
    assert f"lacks key-encryption key {crypto.key_id(KEK_A)}" in wrong and KEY_B not in wrong

    asyncio.run(waiting_batch(dsn, 2))  # its inputs wait sealed under the old key

    rotated = relay_cli("rotate-keys", env=relay_env(dsn, RELAY_ENCRYPTION_KEY=f"{KEY_B} {KEY_A}"))
    assert rotated.returncode == 0, rotated.stderr
    assert "re-wrapped 3/3 data keys" in rotated.stdout and f"by key {crypto.key_id(KEK_B)}" in rotated.stdout
    assert f"2 waiting batch input(s) sealed again under key {crypto.key_id(KEK_B)}" in rotated.stdout

    with (
        RelayProcess(relay_env(dsn, RELAY_ENCRYPTION_KEY=KEY_B)) as new,
        httpx.Client(base_url=new.url, timeout=30, headers=admin_headers()) as admin,
    ):
        for prediction_id in predictions:
            events = admin.get(f"/predictions/{prediction_id}/events").json()["events"]
            assert [e["prediction"]["input"]["prompt"] for e in events] == [PROMPT] * 6
    assert "lacks key-encryption key" in one_line_refusal(dsn, RELAY_ENCRYPTION_KEY=KEY_A)
    upstream = {"REPLICATE_API_TOKEN": "r8_test", "REPLICATE_API_BASE": "http://127.0.0.1:9"}
    for command in ("reconcile", "forget"):
        refused = relay_cli(
            command, predictions[0], env=relay_env(dsn, RELAY_ENCRYPTION_KEY=KEY_A, **upstream)
        )
        assert refused.returncode == 2 and "lacks key-encryption key" in refused.stderr, refused.stderr


def test_relay_log_lines_carry_no_prompts_urls_or_input_values(postgres):
    """At DEBUG, a whole run (webhooks, simulate, reads, streams, erasure, bad input) logs ids only."""
    dsn = postgres.new_database()
    env = relay_env(dsn, RELAY_ENCRYPTION_KEY=KEY_A, RELAY_LOG_LEVEL="DEBUG")
    prediction_id = new_prediction_id()
    with RelayProcess(env) as relay, httpx.Client(base_url=relay.url, timeout=30) as http:
        bodies = personal_lifecycle(prediction_id)
        deliver(http, bodies)
        bad = dict(bodies[0], id=None)
        assert post_webhook(http, bad).status_code == 400
        assert post_webhook(http, b"\xff" + PROMPT.encode()).status_code == 400
        simulated = relay_cli(
            "simulate",
            "--url",
            f"{relay.url}/webhooks/replicate",
            "--predictions",
            "3",
            "--secret",
            WEBHOOK_SECRET,
            env=env,
        )
        assert simulated.returncode == 0, simulated.stderr
        http.get(f"/predictions/{prediction_id}/events", headers=admin_headers())
        ws_messages(relay, f"/predictions/{prediction_id}/ws")
        assert http.delete(f"/admin/predictions/{prediction_id}", headers=admin_headers()).status_code == 200
    output = relay.read_output()
    assert f"prediction {prediction_id} status succeeded" in output, "DEBUG lines were expected"
    assert "acknowledged 18" in simulated.stdout, "simulate's summary was expected"
    for personal in (PROMPT, "Zebulon", IMAGE_URL, "8675309", "replicate.delivery", "Remove the background"):
        assert personal not in output and personal not in simulated.stdout + simulated.stderr


def test_predictions_created_and_reconciled_through_relay_are_sealed_and_never_logged(postgres, fake):
    """The API proxy and `relay reconcile` (its own process) store ciphertext and log no input."""
    dsn = postgres.new_database()
    create = {"model": QWEN, "input": {"image": [IMAGE_URL], "prompt": PROMPT}}
    fake.reset()
    fake.lose = {"completed"}
    with relay_for(dsn, fake, RELAY_ENCRYPTION_KEY=KEY_A, RELAY_LOG_LEVEL="DEBUG") as relay:
        with api_client(relay) as api:
            prediction_id = api.post("/api/predictions", json=create).json()["id"]
        deadline = time.monotonic() + 10
        while fake.predictions[prediction_id]["status"] != "succeeded" or fake.tasks:
            assert time.monotonic() < deadline, "the fake never finished the prediction"
            time.sleep(0.02)
        result = reconcile_cli(relay, prediction_id, RELAY_ENCRYPTION_KEY=KEY_A)
        assert result.returncode == 0 and "appended" in result.stdout, result.stderr
        events = httpx.get(f"{relay.url}/predictions/{prediction_id}/events", headers=admin_headers()).json()
    assert events["events"][-1]["source"] == "reconcile"
    assert {e["prediction"]["input"]["prompt"] for e in events["events"]} == {PROMPT}
    rows = query(dsn, "SELECT source, encrypted, body FROM events WHERE prediction_id = $1", prediction_id)
    assert {row["source"] for row in rows} == {"webhook", "reconcile"} and all(
        row["encrypted"] for row in rows
    )
    assert not any(PROMPT.encode() in row["body"] or b"zebulon" in row["body"] for row in rows)
    for personal in (PROMPT, IMAGE_URL):
        assert personal not in relay.read_output() and personal not in result.stdout + result.stderr
