"""Relay's uses of uvicorn internals are checked at start-up: a uvicorn lacking one is refused in a line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.core.errors import ConfigError
from service.web.uvicorn_internals import REQUIRED, check_uvicorn, missing_internals

from .support import ROOT, relay_env


def test_the_installed_uvicorn_has_everything_relay_relies_on():
    """The pinned uvicorn passes the check that `relay serve` runs."""
    assert missing_internals() == []
    check_uvicorn()


def test_a_missing_class_or_attribute_is_named_in_one_line():
    """Each missing name is listed, and the message says how to fix it."""
    required = (
        *REQUIRED,
        ("uvicorn.server", "Server", ("shutdown", "_gone_in_a_future_release"), ("_nor_this",)),
        ("uvicorn.protocols.nowhere", "Protocol", ("shutdown",), ()),
    )
    with pytest.raises(ConfigError) as raised:
        check_uvicorn(required)
    message = str(raised.value)
    assert "\n" not in message
    assert "uvicorn.server.Server._gone_in_a_future_release" in message
    assert "uvicorn.server.Server._nor_this" in message and "Server.shutdown" not in message
    assert "uvicorn.protocols.nowhere.Protocol" in message and "requirements.lock" in message


def test_relay_serve_refuses_a_uvicorn_without_what_it_relies_on(dsn):
    """`relay serve` exits 2 with one line, before listening, when a relied-on method is gone."""
    program = (
        "import sys\n"
        "from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol as W\n"
        "del W.stop_keepalive\n"
        "from service.cli.main import main\n"
        "sys.exit(main(['serve', '--port', '1']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=relay_env(dsn),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "WebSocketsSansIOProtocol.stop_keepalive" in lines[0], done.stderr
