"""Operator commands meet a user's mistake with one line and exit 2, never a traceback."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import asyncpg
import pytest

from service.ops.simulate import lifecycle

from .support import (
    ROOT,
    dev_env,
    new_prediction_id,
    new_webhook_id,
    post_webhook,
    query,
    relay_cli,
    relay_env,
)

PASSWORD = "hunter2-not-for-output"


def one_line_error(result, *mentions: str) -> str:
    """The command exited 2 with a single `relay…: error:` line naming each of `mentions`."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], result.stderr
    for mention in mentions:
        assert mention in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("keep", ["99999999999d", "365001d", "9" * 5000 + "d"])
def test_retention_keep_longer_than_the_calendar_is_one_line(dsn, keep):
    """A --keep too long for a date (or with thousands of digits) is one line, exit 2."""
    result = relay_cli("retention", "--keep", keep, "--dry-run", env=relay_env(dsn))
    one_line_error(result, "--keep", "at most")


def test_export_into_a_closed_pipe_stops_quietly(relay, client):
    """`relay export | head -1`: the reader leaves early; relay stops without a traceback."""
    for _ in range(3):
        post_webhook(client, lifecycle(new_prediction_id())[-1])
    command = [sys.executable, "-m", "service", "export", "--quiet"]
    with subprocess.Popen(
        command, env=relay.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # the reader is gone before the first line is written
        stderr = process.stderr.read().decode()
        code = process.wait(timeout=60)
    assert stderr == "", stderr
    assert code == 141


def many_events(relay, tag: str) -> tuple[int, str]:
    """6,000 events of ~300 bytes after the log's head (more than a pipe holds), and the
    uninterrupted export of them: the head before them and that export."""
    dsn = relay.env["DATABASE_URL"]
    start = query(dsn, "SELECT coalesce(max(seq), 0) AS s FROM events")[0]["s"]
    query(
        dsn,
        "INSERT INTO events (webhook_id, prediction_id, status, source, body, received_at)"
        " SELECT $2 || '_' || n || '_' || $1, $2 || (n % 5), 'processing', 'webhook',"
        " convert_to('{\"n\":' || n || ',\"pad\":\"' || repeat('x', 300) || '\"}', 'UTF8'), now()"
        " FROM generate_series(1, 6000) AS n",
        new_webhook_id(),
        tag,
    )
    return start, relay_cli("export", "--quiet", "--after", str(start), env=relay.env).stdout


def test_ctrl_c_mid_export_says_where_to_resume_and_the_rest_follows_without_a_gap(relay):
    """Ctrl-C during `relay export` leaves whole lines up to seq S and says so in one line;
    `--after S` writes exactly the rest: together they are the uninterrupted export."""
    start, whole = many_events(relay, "ctrlc")
    command = [sys.executable, "-m", "service", "export", "--quiet", "--after", str(start)]
    with subprocess.Popen(
        command, env=relay.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()  # exporting; blocked on the full pipe soon after
        process.send_signal(signal.SIGINT)
        part = first + process.stdout.read()
        stderr = process.stderr.read()
        assert process.wait(timeout=60) == 130
    assert "Traceback" not in stderr and stderr.count("\n") == 1, stderr
    last_seq = json.loads(part.splitlines()[-1])["seq"]
    assert stderr.endswith(f"up to seq {last_seq}\n") and f"--after {last_seq} " in stderr, stderr
    assert part.endswith("\n") and len(part) < len(whole)
    rest = relay_cli("export", "--quiet", "--after", str(last_seq), env=relay.env).stdout
    assert part + rest == whole


def test_tail_after_beyond_the_head_is_one_line_not_endless_retries(relay):
    """Relay refuses an `--after` past the log's head (1008): `relay tail` says so once, exit 2."""
    result = relay_cli("tail", "--after", str(2**62), "--url", relay.url, env=relay.env, timeout=30)
    one_line_error(result, "beyond the log's head", "--after")


def test_usage_on_an_unmigrated_database_is_one_line(postgres):
    """`relay usage` before `relay migrate`: one line saying so, not an UndefinedTableError."""
    result = relay_cli("usage", env=relay_env(postgres.new_database(migrate=False)))
    one_line_error(result, "not migrated", "relay migrate")


@pytest.mark.parametrize("command", ["usage", "events", "export"])
def test_reads_go_to_the_read_database_url_and_its_failure_names_it(dsn, command):
    """`relay usage`, `events` and `export` read RELAY_READ_DATABASE_URL when set (the runbook's
    list); when it is down, the line names that variable, not DATABASE_URL, and no password."""
    env = relay_env(dsn, RELAY_READ_DATABASE_URL=f"postgresql://relay:{PASSWORD}@127.0.0.1:1/relay")
    line = one_line_error(relay_cli(command, env=env), "RELAY_READ_DATABASE_URL")
    assert PASSWORD not in line


@pytest.mark.parametrize("how", ["flag", "variable"])
def test_a_port_past_65535_is_one_line(dsn, how):
    """`--port 70000` (or RELAY_PORT=70000) is refused in one line; it used to hang `relay serve`
    after printing a banner for a port no socket can have."""
    args, extra = (("--port", "70000"), {}) if how == "flag" else ((), {"RELAY_PORT": "70000"})
    result = relay_cli("serve", *args, env=relay_env(dsn, **extra), timeout=30)
    one_line_error(result, "RELAY_PORT must be at most 65535")
    assert result.stdout == ""


@pytest.mark.parametrize("content", ['{"admin_token": "trunc', "[]", ""])
def test_dev_mode_with_an_unreadable_secrets_file_is_one_line(tmp_path, content):
    """A damaged RELAY_DATA_DIR/secrets.json (a disk that filled mid-write) is one line naming
    it and what to do, for the server and the operator commands alike."""
    (tmp_path / "secrets.json").write_text(content)
    for args in (("token", "p1"), ("events",), ("serve", "--port", "0")):
        result = relay_cli(*args, env=dev_env(tmp_path), timeout=30)
        one_line_error(result, "secrets.json", "move it away")


@pytest.mark.parametrize("args", [("token", "p1"), ("events",)])
def test_dev_mode_with_a_data_dir_that_is_a_file_is_one_line(tmp_path, args):
    """RELAY_DATA_DIR naming a file: one line asking for a writable directory, not a traceback."""
    data_dir = tmp_path / "not-a-dir"
    data_dir.write_text("")
    one_line_error(relay_cli(*args, env=dev_env(data_dir), timeout=30), "writable directory")


def test_dev_secrets_are_written_whole_and_private(tmp_path):
    """The generated secrets file is complete JSON, mode 0600, with no temporary file left."""
    assert relay_cli("token", "p1", env=dev_env(tmp_path)).returncode == 0
    stored = json.loads((tmp_path / "secrets.json").read_text())
    assert set(stored) == {"webhook_secrets", "admin_token", "subscribe_key"}
    assert (tmp_path / "secrets.json").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secrets.json"]


def test_database_lost_mid_export_is_one_line_with_where_to_resume(relay):
    """The server going away mid-export (a restart, a failover) is one line, exit 2, saying which
    `--after` writes the rest; with it, the two outputs are the whole export."""
    dsn = relay.env["DATABASE_URL"]
    start, whole = many_events(relay, "lost")
    command = [sys.executable, "-m", "service", "export", "--quiet", "--after", str(start)]
    with subprocess.Popen(
        command, env=relay.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()  # the export's transaction is open, its pipe filling
        ended = query(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND state = 'idle in transaction'",
        )
        assert len(ended) == 1
        part = first + process.stdout.read()
        stderr = process.stderr.read()
        assert process.wait(timeout=60) == 2
    line = one_line_error(subprocess.CompletedProcess(command, 2, part, stderr), "lost the connection")
    last_seq = json.loads(part.splitlines()[-1])["seq"]
    assert line.endswith(f"up to seq {last_seq}") and f"--after {last_seq} " in line
    rest = relay_cli("export", "--quiet", "--after", str(last_seq), env=relay.env).stdout
    assert part + rest == whole


def test_serve_on_a_port_in_use_is_one_line_and_no_banner(dsn):
    """`relay serve` where another process listens: one line, exit 2, and no "listening" banner
    (it printed the banner, then uvicorn's error, and exited 3)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = relay_cli("serve", "--port", str(port), env=relay_env(dsn), timeout=30)
    one_line_error(result, f"127.0.0.1:{port}", "in use", "--port")
    assert result.stdout == ""


def test_serve_on_a_host_that_is_not_this_machine_is_one_line(dsn):
    """A RELAY_HOST that does not resolve is one line naming it, exit 2."""
    result = relay_cli("serve", env=relay_env(dsn, RELAY_HOST="no-such-host.invalid"), timeout=30)
    one_line_error(result, "RELAY_HOST 'no-such-host.invalid'")
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args, to_stdout",
    [(("export", "-o", "/dev/full"), False), (("export",), True), (("events",), True)],
)
def test_an_output_that_cannot_take_more_is_one_line(relay, client, args, to_stdout):
    """A full disk under `-o FILE` or stdout is one line saying so, exit 2 (not a traceback, and
    not mistaken for a lost database)."""
    post_webhook(client, lifecycle(new_prediction_id())[-1])
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "service", *args],
            env=relay.env,
            cwd=ROOT,
            stdout=full if to_stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    one_line_error(result, "cannot write the output", "No space left on device")


@pytest.mark.parametrize("variable", ["RELAY_PUBLIC_URL", "REPLICATE_API_BASE"])
@pytest.mark.parametrize("args", [("serve",), ("tail",)])
def test_a_base_url_without_its_scheme_is_one_line_naming_it(dsn, variable, args):
    """`RELAY_PUBLIC_URL=relay.example.com` made the webhook URL `relay.example.com/webhooks/…`
    (which Replicate cannot call) and `relay tail` blame a --url never given: now one line naming
    the variable, exit 2."""
    env = relay_env(dsn, **{variable: "relay.example.com"})
    result = relay_cli(*args, env=env, timeout=30)
    one_line_error(result, variable, "http:// or https://")
    assert result.stdout == ""


def test_ctrl_c_while_replay_plans_says_nothing_was_sent(dsn):
    """Ctrl-C before the plan is made: one line saying nothing was sent (it said `up to seq None:
    resume with --after None`)."""

    async def interrupt_while_planning() -> tuple[int | None, str]:
        holder = await asyncpg.connect(dsn)
        try:
            async with holder.transaction():
                await holder.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")  # the plan waits
                process = await asyncio.create_subprocess_exec(
                    *[sys.executable, "-m", "service", "replay", "--fanout", "--quiet"],
                    env=relay_env(dsn),
                    cwd=ROOT,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                while not await holder.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                ):
                    await asyncio.sleep(0.05)
                    await holder.execute("SELECT pg_stat_clear_snapshot()")  # kept per transaction
                process.send_signal(signal.SIGINT)
                _, stderr = await asyncio.wait_for(process.communicate(), 60)
        finally:
            await holder.close()
        return process.returncode, stderr.decode()

    code, stderr = asyncio.run(interrupt_while_planning())
    assert code == 130
    assert stderr == "relay replay: interrupted before anything was sent\n"


@pytest.mark.parametrize("delay", [0.15, 0.3, 0.45])
def test_ctrl_c_while_relay_starts_exits_without_a_traceback(dsn, delay):
    """Ctrl-C in the first half second of any command (its modules still loading) ends it like
    Ctrl-C later: no import traceback."""
    with subprocess.Popen(
        [sys.executable, "-m", "service", "events"],
        env=relay_env(dsn),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr, stderr
    assert process.returncode in (130, -signal.SIGINT, 0), stderr
