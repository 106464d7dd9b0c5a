from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .fake_replicate import FakeReplicate, api_client, relay_for
from .fileserver import elsewhere, files  # noqa: F401 - fixtures for the archive tests
from .receiver import receiver  # noqa: F401 - a fixture for the replay and privacy tests
from .support import Postgres, RelayProcess, admin_headers, relay_env


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Postgres:
    return Postgres(tmp_path_factory.mktemp("postgres"))


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[Postgres]:
    """A throwaway cluster for one test, which may stop and restart it. Stopped at the end: the
    wheel's exit handler knows only the first postmaster and would leave a restarted one running."""
    postgres = Postgres(tmp_path, own=True)
    yield postgres
    with contextlib.suppress(subprocess.CalledProcessError):
        postgres.stop_server()


@pytest.fixture
def dsn(postgres: Postgres) -> str:
    """A fresh migrated database for one test."""
    return postgres.new_database()


@pytest.fixture(scope="module")
def relay(postgres: Postgres) -> Iterator[RelayProcess]:
    """One `relay serve` process (and database) shared by a test module."""
    with RelayProcess(relay_env(postgres.new_database())) as process:
        yield process


@pytest.fixture
def client(relay: RelayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=relay.url, timeout=30) as http:
        yield http


@pytest.fixture
def admin(relay: RelayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=relay.url, timeout=30, headers=admin_headers()) as http:
        yield http


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeReplicate]:
    """A fake Replicate API (a real HTTP server) shared by a test module."""
    with FakeReplicate() as server:
        yield server


@pytest.fixture(scope="module")
def api_relay(postgres: Postgres, fake: FakeReplicate) -> Iterator[RelayProcess]:
    """A `relay serve` (and database) whose upstream is the module's fake Replicate."""
    with relay_for(postgres.new_database(), fake) as process:
        yield process


@pytest.fixture
def api(api_relay: RelayProcess, fake: FakeReplicate) -> Iterator[httpx.Client]:
    """A client with an API key, against a fake Replicate reset for this test."""
    fake.reset()
    with api_client(api_relay) as http:
        yield http
