"""Operator commands meet a user's mistake with one line and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.ops.simulate import lifecycle

from .support import ROOT, new_prediction_id, post_webhook, relay_cli, relay_env


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
