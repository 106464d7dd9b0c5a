"""A streaming standby (`pg_basebackup -R`) as RELAY_READ_DATABASE_URL, and as a wrong writer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from .databases import Standby, wait_for_replay
from .support import (
    Postgres,
    RelayProcess,
    admin_headers,
    deliver_lifecycle,
    new_prediction_id,
    query,
    relay_cli,
    relay_env,
    with_database,
)


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    cluster = Postgres(tmp_path_factory.mktemp("primary"), own=True)
    yield cluster
    cluster.stop_server()


@pytest.fixture(scope="module")
def standby(primary: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standby]:
    primary.new_database()  # the schema exists before the copy is taken, as in production
    replica = Standby(primary, tmp_path_factory.mktemp("replica"))
    yield replica
    replica.stop()


@pytest.fixture
def pair(primary: Postgres, standby: Standby) -> tuple[str, str]:
    """A migrated database on the primary, and the same database read on the standby."""
    dsn = primary.new_database()
    name = dsn.split("?")[0].rsplit("/", 1)[1]
    wait_for_replay(dsn, standby.dsn(name))
    return dsn, standby.dsn(name)


def test_export_from_the_replica_is_byte_identical_to_the_primary(pair, tmp_path: Path):
    """Operator reads go to RELAY_READ_DATABASE_URL and see exactly what the primary holds."""
    dsn, replica = pair
    with RelayProcess(relay_env(dsn)) as relay, httpx.Client(base_url=relay.url) as client:
        for _ in range(5):
            deliver_lifecycle(client, new_prediction_id())
    wait_for_replay(dsn, replica)
    primary_out, replica_out = tmp_path / "primary.jsonl", tmp_path / "replica.jsonl"
    assert relay_cli("export", "-o", str(primary_out), env=relay_env(dsn)).returncode == 0
    done = relay_cli("export", "-o", str(replica_out), env=relay_env(dsn, RELAY_READ_DATABASE_URL=replica))
    assert done.returncode == 0, done.stderr
    assert replica_out.read_bytes() == primary_out.read_bytes()
    assert len(primary_out.read_bytes().splitlines()) == 5 * 6


def test_a_reader_of_the_replica_never_skips_a_row_while_the_primary_ingests(pair):
    """Paging /admin/events by seq on a lagging replica sees every seq, in order, none twice."""
    dsn, replica = pair
    env = relay_env(dsn, RELAY_READ_DATABASE_URL=replica)
    with RelayProcess(env) as relay:
        done = threading.Event()

        def ingest() -> None:
            with httpx.Client(base_url=relay.url, timeout=30) as client:
                for _ in range(30):
                    deliver_lifecycle(client, new_prediction_id())
            done.set()

        writer = threading.Thread(target=ingest)
        writer.start()
        seen: list[int] = []
        with httpx.Client(base_url=relay.url, headers=admin_headers(), timeout=30) as admin:
            while True:
                finished = done.is_set()
                page = admin.get(
                    "/admin/events", params={"after": seen[-1] if seen else 0, "limit": 50}
                ).json()
                seen += [event["seq"] for event in page["events"]]
                if finished and not page["events"]:
                    wait_for_replay(dsn, replica)
                    page = admin.get("/admin/events", params={"after": seen[-1], "limit": 1000}).json()
                    seen += [event["seq"] for event in page["events"]]
                    break
        writer.join()
    assert seen == [row[0] for row in query(dsn, "SELECT seq FROM events ORDER BY seq")]


def test_serve_against_a_standby_is_one_clear_line(pair):
    """A read-only DATABASE_URL: exit 2 before anything else, naming the cause; no traceback."""
    _, replica = pair
    done = relay_cli("serve", "--port", "0", env=relay_env(replica), timeout=30)
    assert done.returncode == 2
    assert "read-only" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_target_session_attrs_read_write_on_a_standby_is_one_clear_line(pair):
    _, replica = pair
    done = relay_cli("migrate", env=relay_env(replica + "&target_session_attrs=read-write"), timeout=30)
    assert done.returncode == 2
    assert "target_session_attrs" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "command", [("migrate",), ("forget", "p1"), ("rotate-keys",), ("retention", "--keep", "9d")]
)
def test_commands_that_write_refuse_a_standby_in_one_line(pair, command: tuple[str, ...]):
    _, replica = pair
    key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    done = relay_cli(*command, env=relay_env(replica, RELAY_ENCRYPTION_KEY=key), timeout=30)
    assert done.returncode == 2, done.stderr
    assert "read-only" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_replay_to_subscribers_needs_the_primary_and_says_so(pair):
    """Replaying to live subscribers NOTIFYs: on a standby it is one line naming DATABASE_URL."""
    dsn, replica = pair
    done = relay_cli("replay", "--fanout", env=relay_env(replica), timeout=30)
    assert done.returncode == 2
    assert "DATABASE_URL" in done.stderr and "Traceback" not in done.stderr
    # With the primary as DATABASE_URL and the standby for reads, it works.
    done = relay_cli("replay", "--fanout", env=relay_env(dsn, RELAY_READ_DATABASE_URL=replica), timeout=30)
    assert done.returncode == 0, done.stderr


def test_readyz_names_a_database_that_became_read_only(primary: Postgres):
    """/readyz answers 503 with the cause when the writer's database turns read-only."""
    dsn = primary.new_database()
    name = dsn.split("?")[0].rsplit("/", 1)[1]
    with RelayProcess(relay_env(dsn)) as relay:
        query(primary.admin_dsn, f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        asyncio.run(expire(with_database(primary.admin_dsn, name)))
        response = httpx.get(relay.url + "/readyz")
        assert response.status_code == 503 and "read-only" in response.json()["reason"]


async def expire(dsn: str) -> None:
    """End the database's other sessions, so the service's next connections see the new setting."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
