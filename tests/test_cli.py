"""The `relay` command as a user meets it: dev mode, restarts, config errors, migrate, simulate."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import time

import asyncpg
import httpx
import jwt
import pytest

from service.db.migrations import migration_files
from service.ops.simulate import lifecycle

from .support import (
    ROOT,
    SUBSCRIBE_KEY,
    WEBHOOK_SECRET,
    RelayProcess,
    admin_headers,
    alive,
    dev_env,
    free_port,
    new_prediction_id,
    post_webhook,
    postmaster_pid,
    relay_cli,
    relay_env,
)


def test_dev_mode_generates_secrets_keeps_data_and_stops_postgres_on_ctrl_c_and_sigterm(tmp_path):
    """Ctrl-C (SIGINT) and SIGTERM both exit 0 and stop the embedded postmaster; the first start
    prints the banner and nothing else (migrations are applied quietly)."""
    data_dir = tmp_path / "relay-data"
    port = free_port()
    first = RelayProcess(dev_env(data_dir), port=port).start(timeout=60)
    postmaster = postmaster_pid(data_dir / "pg")
    stored = json.loads((data_dir / "secrets.json").read_text())
    key = base64.b64decode(stored["webhook_secrets"].removeprefix("whsec_"))
    prediction = lifecycle(new_prediction_id())[-1]
    with httpx.Client(base_url=first.url) as http:
        assert post_webhook(http, prediction, key=key).status_code == 200
    assert first.stop(signal.SIGINT) == 0
    printed = [line for line in first.read_output().splitlines(True) if " uvicorn.access: " not in line]
    assert "".join(printed) == (
        f"Relay listening on http://127.0.0.1:{port}\n"
        f"  webhook URL:    http://127.0.0.1:{port}/webhooks/replicate\n"
        f"  webhook secret: {stored['webhook_secrets']}  (generated; give it to Replicate)\n"
        f"  dashboard:      http://127.0.0.1:{port}/#token={stored['admin_token']}\n"
    )
    assert not alive(postmaster), "embedded Postgres must stop with Relay on Ctrl-C"

    second = RelayProcess(dev_env(data_dir), port=port).start(timeout=60)
    postmaster = postmaster_pid(data_dir / "pg")
    try:
        headers = {"Authorization": f"Bearer {stored['admin_token']}"}
        state = httpx.get(f"{second.url}/predictions/{prediction['id']}", headers=headers).json()
        assert state["status"] == "succeeded" and state["event_count"] == 1
    finally:
        assert second.stop(signal.SIGTERM) == 0
    assert not alive(postmaster), "embedded Postgres must stop with Relay on SIGTERM"
    assert (data_dir / "secrets.json").stat().st_mode & 0o077 == 0


def test_a_secret_from_the_environment_is_never_printed(tmp_path):
    env = dev_env(tmp_path, REPLICATE_WEBHOOK_SECRET=WEBHOOK_SECRET, RELAY_ADMIN_TOKEN="env-admin-token-123")
    process = RelayProcess(env).start(timeout=60)
    process.stop()
    output = process.read_output()
    assert WEBHOOK_SECRET not in output and "env-admin-token-123" not in output
    assert "webhook URL:" in output and "#token=" not in output


@pytest.mark.parametrize("missing", ["REPLICATE_WEBHOOK_SECRET", "RELAY_ADMIN_TOKEN", "RELAY_SUBSCRIBE_KEY"])
def test_with_database_url_a_missing_secret_is_a_one_line_error(postgres, missing):
    env = relay_env(postgres.admin_dsn)
    del env[missing]
    result = relay_cli("serve", "--port", str(free_port()), env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and missing in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "name, value, mentions",
    [
        ("RELAY_PORT", "eighty", "RELAY_PORT"),
        ("RELAY_WEBHOOK_TOLERANCE", "0", "RELAY_WEBHOOK_TOLERANCE"),
        ("REPLICATE_WEBHOOK_SECRET", "whsec_***secret-value***", "REPLICATE_WEBHOOK_SECRET"),
    ],
)
def test_malformed_configuration_is_a_one_line_error(postgres, name, value, mentions):
    env = relay_env(postgres.admin_dsn, **{name: value})
    result = relay_cli("serve", env=env)
    assert result.returncode == 2 and mentions in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "secret-value" not in result.stderr


def test_serve_flags_take_effect_and_beat_the_environment(postgres):
    """Each flag replaces its variable: here the environment's database, secret, tolerance and
    body limit are all wrong or looser, and the flags' values are the ones a delivery meets."""
    other_secret = "whsec_" + base64.b64encode(b"the-environment-secret").decode()
    env = relay_env(
        f"postgresql://nobody@127.0.0.1:{free_port()}/nothing",
        REPLICATE_WEBHOOK_SECRET=other_secret,
        RELAY_WEBHOOK_TOLERANCE="3600",
        RELAY_MAX_BODY="10000000",
    )
    flags = ("--database-url", postgres.new_database(), "--webhook-secret", WEBHOOK_SECRET)
    limits = ("--webhook-tolerance", "30", "--max-body", "2000")
    with RelayProcess(env, args=flags + limits) as relay, httpx.Client(base_url=relay.url) as http:
        body = lifecycle(new_prediction_id())[0]
        assert len(json.dumps(body)) < 2000
        assert post_webhook(http, body, timestamp=int(time.time()) - 20).status_code == 200
        stale = post_webhook(http, body, timestamp=int(time.time()) - 60)
        assert stale.status_code == 401 and "30s" in stale.json()["error"]["message"]
        large = post_webhook(http, {**body, "logs": "x" * 2000})
        assert large.status_code == 413
        signed_with_env_secret = base64.b64decode(other_secret.removeprefix("whsec_"))
        assert post_webhook(http, body, key=signed_with_env_secret).status_code == 401
    assert WEBHOOK_SECRET not in relay.read_output()


def test_an_unreachable_database_is_a_one_line_error_without_the_dsn():
    dsn = f"postgresql://relay:hunter2@127.0.0.1:{free_port()}/relay"
    result = relay_cli("migrate", env=relay_env(dsn))
    assert result.returncode == 2 and "cannot connect to the database" in result.stderr
    assert "hunter2" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("events", "--colour", "red"), "unrecognized arguments: --colour red"),
        (("events", "--limit", "abc"), "argument --limit: invalid int value: 'abc'"),
        (("export", "--format", "csv"), "unrecognized arguments: --format csv"),
        (("replay", "--fanout", "--concurrency", "x"), "argument --concurrency: invalid int value: 'x'"),
        (("replay", "--since", "2026-11-01"), "one of the arguments --to --fanout is required"),
        (("tail", "--after", "x"), "argument --after: invalid int value: 'x'"),
        (("usage", "--group", "week"), "argument --group: invalid choice: 'week'"),
        ((), "the following arguments are required: command"),
    ],
)
def test_a_flag_mistake_is_one_line_naming_the_command_and_exit_2(args, problem):
    """No usage block: one line with the command, the problem and where to read more."""
    result = relay_cli(*args, env=relay_env(f"postgresql://127.0.0.1:{free_port()}/unused"))
    command = " ".join(["relay", *args[:1]])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"{command}: error: {problem}"), result.stderr
    assert result.stderr.endswith(f" (see {command} --help)\n") and result.stderr.count("\n") == 1


def test_token_command_mints_a_token_for_one_prediction(postgres):
    result = relay_cli("token", "pred123", "--ttl", "60", env=relay_env(postgres.admin_dsn))
    assert result.returncode == 0
    claims = jwt.decode(result.stdout.strip(), SUBSCRIBE_KEY, algorithms=["HS256"])
    assert claims["prediction"] == "pred123"
    refused = relay_cli("token", "pred123", "--ttl", "0", env=relay_env(postgres.admin_dsn))
    assert refused.returncode == 2 and "--ttl" in refused.stderr


def test_two_concurrent_migrations_apply_each_file_once(postgres):
    dsn = postgres.new_database(migrate=False)
    env = relay_env(dsn)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "service", "migrate"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    assert [p.wait(60) for p in procs] == [0, 0]
    reports = sorted(p.stdout.read() for p in procs)
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    # Each migration runs under its own lock, so the two may share the work: together, in
    # order, they apply every file exactly once.
    every = [path.stem for path in migration_files()]
    applied = [name for report in reports for name in report.partition(": ")[2].split(", ") if name.strip()]
    assert sorted(name.strip() for name in applied) == sorted(every)

    async def versions() -> list[str]:
        conn = await asyncpg.connect(dsn)
        try:
            return [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        finally:
            await conn.close()

    applied = asyncio.run(versions())
    assert len(applied) == len(set(applied)) and "001_event_log" in applied


def test_simulate_end_to_end_leaves_every_prediction_in_its_final_state(relay, tmp_path):
    report_file = tmp_path / "report.json"
    result = relay_cli(
        "simulate",
        "--url",
        relay.url + "/webhooks/replicate",
        "--predictions",
        "30",
        "--concurrency",
        "6",
        "--duplicates",
        "0.2",
        "--reorder",
        "0.3",
        "--failures",
        "0.3",
        "--seed",
        "7",
        "--report",
        str(report_file),
        env=relay.env,
    )
    assert result.returncode == 0, result.stderr
    assert "rejected 0, failed 0" in result.stdout
    report = json.loads(report_file.read_text())
    assert len(report["final_status"]) == 30
    assert set(report["final_status"].values()) >= {"succeeded"}
    with httpx.Client(base_url=relay.url, headers=admin_headers()) as http:
        states = [http.get(f"/predictions/{p}").json() for p in report["final_status"]]
    assert [state["status"] for state in states] == list(report["final_status"].values())
    predict_times = {state["metrics"]["predict_time"] for state in states}
    assert len(predict_times) > 10 and all(1.0 <= t <= 12.0 for t in predict_times)  # GPU seconds vary


def test_simulate_reports_rejections_with_a_nonzero_exit(relay):
    other = "whsec_" + base64.b64encode(b"not-the-configured-secret").decode()
    result = relay_cli(
        "simulate",
        "--url",
        relay.url + "/webhooks/replicate",
        "--predictions",
        "2",
        "--secret",
        other,
        env=relay.env,
    )
    assert result.returncode == 1 and "rejected" in result.stderr


def test_a_sender_needs_no_server_secrets(relay, tmp_path):
    """`relay simulate --url --secret` and `relay token` ask only for what they use."""
    server_secrets = ("REPLICATE_WEBHOOK_SECRET", "RELAY_ADMIN_TOKEN", "RELAY_SUBSCRIBE_KEY")
    deployed = {k: v for k, v in relay.env.items() if k not in server_secrets}
    data_dir = tmp_path / "untouched"
    for env in (deployed, dev_env(data_dir)):
        args = ("simulate", "--url", relay.url + "/webhooks/replicate", "--secret", WEBHOOK_SECRET)
        result = relay_cli(*args, "--predictions", "2", env=env)
        assert result.returncode == 0, result.stderr
        assert "acknowledged 12" in result.stdout
    assert not data_dir.exists()  # nothing generated for a command that only sends
    token = relay_cli("token", "p1", env={**deployed, "RELAY_SUBSCRIBE_KEY": SUBSCRIBE_KEY})
    assert token.returncode == 0, token.stderr
    assert jwt.decode(token.stdout.strip(), SUBSCRIBE_KEY, algorithms=["HS256"])["prediction"] == "p1"


def test_relay_migrate_needs_only_the_database(postgres):
    """A migration Job gets the owner's DATABASE_URL and none of the service's secrets."""
    server_secrets = ("REPLICATE_WEBHOOK_SECRET", "RELAY_ADMIN_TOKEN", "RELAY_SUBSCRIBE_KEY")
    env = {
        k: v for k, v in relay_env(postgres.new_database(migrate=False)).items() if k not in server_secrets
    }
    result = relay_cli("migrate", env=env)
    assert result.returncode == 0, result.stderr
    assert "001_event_log" in result.stdout


def test_simulate_refuses_bad_flags(relay):
    result = relay_cli("simulate", "--duplicates", "2", env=relay.env)
    assert result.returncode == 2 and "--duplicates" in result.stderr


def test_with_database_url_stored_dev_secrets_are_not_used(postgres, tmp_path):
    """Generated dev secrets never leak into a deployment that has DATABASE_URL."""
    data_dir = tmp_path / "data"
    assert relay_cli("token", "p1", env=dev_env(data_dir)).returncode == 0  # generates secrets
    env = {**relay_env(postgres.admin_dsn), "RELAY_DATA_DIR": str(data_dir)}
    del env["RELAY_ADMIN_TOKEN"]
    result = relay_cli("serve", "--port", str(free_port()), env=env)
    assert result.returncode == 2 and "RELAY_ADMIN_TOKEN" in result.stderr
