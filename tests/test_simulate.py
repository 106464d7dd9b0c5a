"""`relay simulate`: the lifecycles it builds, and a run with its defaults against a dev instance."""

from __future__ import annotations

import json
import re
from itertools import pairwise

import httpx
import pytest

from service.ops.simulate import lifecycle

from .support import RelayProcess, dev_env, free_port, new_prediction_id, relay_cli

# A Replicate prediction object, as `GET /v1/predictions/{id}` returns it and webhooks deliver it.
PREDICTION_FIELDS = {
    "id", "model", "version", "input", "logs", "output", "data_removed", "error", "source", "status",
    "created_at", "started_at", "completed_at", "webhook", "webhook_events_filter", "metrics", "urls",
}  # fmt: skip
TQDM_LINE = re.compile(r"^ *(\d+)%\|[█ ]{10}\| \d+/\d+ \[\d\d:\d\d<\d\d:\d\d, [\d.]+it/s\]$")
WEBHOOK = "https://relay.example.com/webhooks/replicate"


def progress(logs: str) -> int:
    """The percentage of the last tqdm line of `logs`."""
    match = TQDM_LINE.match(logs.splitlines()[-1])
    assert match, f"not a tqdm progress line: {logs.splitlines()[-1]!r}"
    return int(match.group(1))


@pytest.mark.parametrize("outcome", ["succeeded", "failed", "canceled"])
def test_every_delivery_is_a_full_prediction_object(outcome):
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id, outcome, webhook=WEBHOOK)
    for body in bodies:
        assert set(body) == PREDICTION_FIELDS
        assert body["id"] == prediction_id and body["webhook"] == WEBHOOK
        assert body["created_at"] == bodies[0]["created_at"] and body["created_at"].endswith("Z")
        assert body["input"]["prompt"] and len(body["version"]) == 64
        assert body["urls"]["get"] == f"https://api.replicate.com/v1/predictions/{prediction_id}"
    assert bodies[0]["status"] == "starting" and bodies[0]["started_at"] is None
    assert all(b["started_at"] is not None for b in bodies[1:])
    assert [b["completed_at"] is not None for b in bodies] == [False] * (len(bodies) - 1) + [True]
    assert bodies[-1]["status"] == outcome


def test_a_success_sends_growing_progress_logs_then_the_output_then_succeeded():
    bodies = lifecycle(new_prediction_id())
    assert [b["status"] for b in bodies] == ["starting", "processing", "processing", "processing"] + [
        "processing",
        "succeeded",
    ]
    logs = [b["logs"] for b in bodies[1:5]]  # the processing deliveries, up to the one with output
    assert all(later.startswith(earlier) and later != earlier for earlier, later in pairwise(logs))
    percents = [progress(text) for text in logs]
    assert percents == sorted(set(percents)) and percents[-1] == 100
    assert bodies[-1]["logs"] == logs[-1]
    assert [b["output"] is not None for b in bodies] == [False] * 4 + [True, True]
    assert bodies[-1]["output"] == bodies[-2]["output"]
    assert bodies[-1]["metrics"]["predict_time"] > 0 and bodies[-1]["error"] is None


def test_a_failure_carries_its_error_and_no_output():
    final = lifecycle(new_prediction_id(), "failed")[-1]
    assert final["status"] == "failed" and final["error"] and final["output"] is None


def test_a_cancellation_has_neither_error_nor_output():
    final = lifecycle(new_prediction_id(), "canceled")[-1]
    assert final["status"] == "canceled" and final["error"] is None and final["output"] is None


def test_without_flags_simulate_signs_with_the_dev_secret_and_targets_this_instance(tmp_path):
    """`relay simulate` next to a dev-mode `relay serve` (same RELAY_DATA_DIR) needs no --url or
    --secret: it signs with the stored dev secret and posts to this instance's webhook URL."""
    port = free_port()
    env = dev_env(tmp_path / "relay-data", RELAY_PORT=str(port))
    report_file = tmp_path / "report.json"
    with RelayProcess(env, port=port) as relay:
        result = relay_cli("simulate", "--predictions", "6", "--failures", "0.5", "--seed", "3",
                           "--report", str(report_file), env=env)  # fmt: skip
        assert result.returncode == 0, result.stderr
        report = json.loads(report_file.read_text())
        expected = sum(len(lifecycle("p", outcome)) for outcome in report["final_status"].values())
        assert report["acknowledged"] == report["sent"] == expected
        assert result.stdout.startswith(f"sent {report['sent']}, acknowledged {report['sent']},")
        stored = json.loads((tmp_path / "relay-data" / "secrets.json").read_text())
        headers = {"Authorization": f"Bearer {stored['admin_token']}"}
        with httpx.Client(base_url=relay.url, headers=headers) as http:
            for prediction_id, outcome in report["final_status"].items():
                events = http.get(f"/predictions/{prediction_id}/events").json()["events"]
                assert events[-1]["status"] == outcome
                assert events[-1]["prediction"]["webhook"] == f"{relay.url}/webhooks/replicate"
