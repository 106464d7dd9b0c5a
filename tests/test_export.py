"""`relay export`: JSON Lines with the exact stored bytes, filtered, streamed."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

from .support import (
    deliver_lifecycle,
    new_prediction_id,
    new_webhook_id,
    post_webhook,
    query,
    relay_cli,
    relay_on_terminal,
)

FIELDS = {"seq", "webhook_id", "prediction_id", "status", "source", "received_at", "webhook_timestamp"}


def export_lines(relay, *args: str) -> list[dict]:
    done = relay_cli("export", "--quiet", *args, env=relay.env)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_export_keeps_the_exact_bytes_of_a_nul_containing_body(relay, client, tmp_path):
    """`body` is the received text byte for byte, even JSON that jsonb refuses (\\u0000)."""
    prediction_id = new_prediction_id()
    logs = "nul \\u0000 here, caf\u00e9 \U0001f600"
    text = f'{{"id": "{prediction_id}", "status": "processing",\n  "logs": "{logs}", "output": null}}'
    body = text.encode()
    webhook_id = new_webhook_id()
    answer = post_webhook(client, body, webhook_id=webhook_id)
    assert answer.status_code == 200, answer.text
    target = tmp_path / "out.jsonl"
    done = relay_cli("export", "--prediction", prediction_id, "-o", str(target), env=relay.env)
    assert done.returncode == 0, done.stderr
    assert "exported 1 event(s)" in done.stderr
    (record,) = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert record["body"].encode("utf-8") == body
    assert set(record) == FIELDS | {"body"}
    assert record["seq"] == answer.json()["seq"] and record["webhook_id"] == webhook_id
    assert record["prediction_id"] == prediction_id and record["status"] == "processing"
    assert record["source"] == "webhook" and record["received_at"].endswith("Z")
    assert record["webhook_timestamp"].endswith("Z")


def test_export_writes_base64_for_bytes_that_are_not_utf8(relay):
    prediction_id = new_prediction_id()
    raw = b'{"id": "%s", "status": "processing", "logs": "\xff\xfe latin-1 \xe9"}' % prediction_id.encode()
    query(
        relay.env["DATABASE_URL"],
        "INSERT INTO events (webhook_id, prediction_id, status, source, body, received_at)"
        " VALUES ($1, $2, 'processing', 'reconcile', $3, $4)",
        new_webhook_id(),
        prediction_id,
        raw,
        datetime.now(UTC),
    )
    (record,) = export_lines(relay, "--prediction", prediction_id)
    assert "body" not in record and base64.b64decode(record["body_b64"]) == raw
    assert record["source"] == "reconcile" and record["webhook_timestamp"] is None


def test_export_applies_filters_in_seq_order(relay, client):
    prediction_id = new_prediction_id()
    seqs = deliver_lifecycle(client, prediction_id)
    records = export_lines(relay, "--prediction", prediction_id, "--status", "processing")
    assert [r["seq"] for r in records] == seqs[1:-1]
    bodies = [json.loads(r["body"]) for r in records]
    assert {(b["id"], b["status"]) for b in bodies} == {(prediction_id, "processing")}
    assert export_lines(relay, "--prediction", prediction_id, "--after", str(seqs[-1])) == []


def test_export_streams_more_rows_than_one_cursor_fetch(relay):
    """A log larger than the cursor's prefetch comes out whole and in order."""
    start = query(relay.env["DATABASE_URL"], "SELECT coalesce(max(seq), 0) AS s FROM events")[0]["s"]
    query(
        relay.env["DATABASE_URL"],
        "INSERT INTO events (webhook_id, prediction_id, status, source, body, received_at)"
        " SELECT 'bulk_' || n || '_' || $1, 'bulk' || (n % 7), 'processing', 'webhook',"
        " convert_to('{\"n\":' || n || '}', 'UTF8'), now() FROM generate_series(1, 2500) AS n",
        new_webhook_id(),
    )
    records = export_lines(relay, "--after", str(start))
    assert [json.loads(r["body"])["n"] for r in records] == list(range(1, 2501))
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)


def test_export_bad_input_is_one_line_and_exit_2(relay, tmp_path):
    for args, message in [
        (("--since", "soon"), "--since must be an ISO 8601 time"),
        (("--before", "-3"), "--before must be a non-negative integer"),
        (("-o", str(tmp_path / "missing-dir" / "x.jsonl")), "-o: cannot write"),
    ]:
        done = relay_cli("export", *args, env=relay.env)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith(f"relay: error: {message}") and done.stderr.count("\n") == 1
        assert "Traceback" not in done.stderr


def test_export_draws_progress_on_a_terminal_only(relay, client):
    prediction_id = new_prediction_id()
    deliver_lifecycle(client, prediction_id)
    done, terminal = relay_on_terminal("export", "--prediction", prediction_id, env=relay.env)
    assert done.returncode == 0
    assert b"exported: 6 (" in terminal and b"/s)" in terminal
    piped = relay_cli("export", "--prediction", prediction_id, env=relay.env)
    assert piped.stderr == "exported 6 event(s) to stdout\n"
    quiet, terminal = relay_on_terminal("export", "--prediction", prediction_id, "--quiet", env=relay.env)
    assert quiet.returncode == 0 and len(quiet.stdout.splitlines()) == 6 and terminal == b""
