"""Relay behind PgBouncer in transaction mode: ingest, fan-out and the operator commands."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from service.ops.simulate import lifecycle

from .databases import pgbouncer
from .streams import read_to_close, stream_url, subscribe
from .support import Postgres, RelayProcess, new_prediction_id, post_webhook, query, relay_cli, relay_env


@pytest.fixture(scope="module")
def bouncer(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with pgbouncer(postgres, tmp_path_factory.mktemp("bouncer")) as base:
        yield base


@pytest.fixture
def pooled(postgres: Postgres, bouncer: str) -> tuple[str, str]:
    """A fresh, unmigrated database: its DSN through PgBouncer, and direct."""
    direct = postgres.new_database(migrate=False)
    return bouncer + urlsplit(direct).path.lstrip("/"), direct


def test_migrate_and_operator_commands_work_through_a_transaction_pooler(pooled, tmp_path: Path):
    """Every command starts and finishes through PgBouncer (no prepared-statement clash)."""
    through, _ = pooled
    env = relay_env(through, RELAY_DATABASE_POOLER="transaction")
    for _ in range(2):  # a second run reuses server connections the first one prepared on
        done = relay_cli("migrate", env=env)
        assert done.returncode == 0, done.stderr
    assert "applied 0 migration(s)" in done.stdout
    for args in (("events", "--limit", "5"), ("export", "-o", str(tmp_path / "out.jsonl")), ("usage",)):
        done = relay_cli(*args, env=env)
        assert done.returncode == 0, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_ingest_and_live_fanout_through_a_transaction_pooler(pooled):
    """Webhooks through the pooler all commit; subscribers get every event live (LISTEN direct)."""
    through, direct = pooled
    assert relay_cli("migrate", env=relay_env(through)).returncode == 0
    env = relay_env(through, RELAY_DATABASE_POOLER="transaction", RELAY_LISTEN_DATABASE_URL=direct)
    predictions = [new_prediction_id() for _ in range(20)]
    with RelayProcess(env) as relay:
        assert "warnings" not in httpx.get(relay.url + "/readyz").json()

        async def watch_all() -> list[list[dict]]:
            async def watch(prediction_id: str) -> list[dict]:
                async with subscribe(stream_url(relay, prediction_id, after=0)) as ws:
                    messages, code = await read_to_close(ws, timeout=60)
                assert code == 1000
                return [m for m in messages if m["type"] == "event"]

            watchers = [asyncio.create_task(watch(p)) for p in predictions]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(deliver_all, relay, predictions)
            return await asyncio.gather(*watchers)

        seen = asyncio.run(watch_all())
    stored = query(direct, "SELECT prediction_id, count(*) FROM events GROUP BY 1")
    assert {row[0]: row[1] for row in stored} == {p: len(lifecycle(p, "succeeded")) for p in predictions}
    assert [len(events) for events in seen] == [len(lifecycle(p, "succeeded")) for p in predictions]


def deliver_all(relay: RelayProcess, predictions: list[str]) -> None:
    """Every lifecycle, predictions concurrently, each prediction's deliveries in order."""

    def deliver(prediction_id: str) -> list[int]:
        with httpx.Client(base_url=relay.url, timeout=30) as client:
            return [post_webhook(client, body).status_code for body in lifecycle(prediction_id, "succeeded")]

    with ThreadPoolExecutor(8) as pool:
        statuses = [s for codes in pool.map(deliver, predictions) for s in codes]
    assert set(statuses) == {200}


def test_listen_through_a_transaction_pooler_is_reported_in_one_line(pooled):
    """A LISTEN that cannot hear is said once at start and in /readyz; events still arrive (poll)."""
    through, _ = pooled
    assert relay_cli("migrate", env=relay_env(through)).returncode == 0
    env = relay_env(through, RELAY_DATABASE_POOLER="transaction")  # LISTEN through the pooler too
    with RelayProcess(env) as relay:
        deadline = time.monotonic() + 15
        while "warnings" not in (ready := httpx.get(relay.url + "/readyz").json()):
            assert time.monotonic() < deadline, ready
            time.sleep(0.2)
        assert "RELAY_LISTEN_DATABASE_URL" in ready["warnings"][0]
        prediction_id = new_prediction_id()

        async def live_event() -> dict:
            async with subscribe(stream_url(relay, prediction_id, after=0)) as ws:
                assert json.loads(await ws.recv())["type"] == "caught_up"
                with httpx.Client(base_url=relay.url) as client:
                    assert post_webhook(client, lifecycle(prediction_id, "succeeded")[0]).status_code == 200
                return json.loads(await asyncio.wait_for(ws.recv(), 10))

        assert asyncio.run(live_event())["prediction_id"] == prediction_id
    lines = [line for line in relay.output.splitlines() if "received no notification" in line]
    assert len(lines) == 1, relay.output


def test_a_pooler_setting_that_is_not_known_is_one_line(pooled):
    through, _ = pooled
    done = relay_cli("serve", env=relay_env(through, RELAY_DATABASE_POOLER="statement"), timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "RELAY_DATABASE_POOLER" in done.stderr
