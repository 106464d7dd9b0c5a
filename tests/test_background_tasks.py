"""Background loops run under one supervisor: a crash is logged, /readyz says 503, nobody hangs."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import httpx
import pytest

from service.core.settings import load_settings
from service.core.signatures import signed_headers
from service.core.supervisor import Supervisor
from service.db import store
from service.db.vault import Vault
from service.ingest.committer import WRITER_TASK
from service.live.hub import Hub
from service.web.app import create_app

from .support import WEBHOOK_KEY, body_of, new_prediction_id, new_webhook_id, query, relay_env, serving_app


def test_a_task_that_raises_or_returns_is_a_named_failure_and_a_stopped_one_is_not(caplog):
    """Raising and returning both count as dying (logged once, with the exception); stop() does not."""

    async def scenario() -> Supervisor:
        supervisor = Supervisor()

        async def crash() -> None:
            raise RuntimeError("boom")

        async def forever() -> None:
            await asyncio.Event().wait()

        async def give_up() -> None:
            return

        supervisor.spawn("crasher", crash())
        supervisor.spawn("quitter", give_up())
        supervisor.spawn("worker", forever())
        await asyncio.sleep(0.05)
        with pytest.raises(ValueError, match="already running"):
            supervisor.spawn("worker", forever())
        await supervisor.stop()
        return supervisor

    with caplog.at_level(logging.ERROR, logger="relay.supervisor"):
        supervisor = asyncio.run(scenario())
    assert supervisor.failures == {"crasher": "RuntimeError", "quitter": "returned"}
    problem = supervisor.problem()
    assert problem is not None and "crasher (RuntimeError)" in problem and "worker" not in problem
    crashed = [r for r in caplog.records if "crasher" in r.getMessage()]
    assert len(crashed) == 1 and crashed[0].exc_info is not None
    assert isinstance(crashed[0].exc_info[1], RuntimeError)


def test_stop_ends_tasks_last_registered_first_through_their_stop_hooks():
    """A loop that feeds the writer stops before the writer; a stop hook replaces the bare cancel."""
    order: list[str] = []

    async def scenario() -> None:
        supervisor = Supervisor()
        for name in ("writer", "feeder"):
            done = asyncio.Event()

            async def loop(done: asyncio.Event = done) -> None:
                await done.wait()

            async def stop(name: str = name, done: asyncio.Event = done) -> None:
                order.append(name)
                done.set()

            supervisor.spawn(name, loop(), stop=stop)
        await asyncio.sleep(0)
        await supervisor.stop()
        assert supervisor.healthy()

    asyncio.run(scenario())
    assert order == ["feeder", "writer"]


def failing_hook(self: Hub, rows: object) -> None:
    raise RuntimeError("a bug in the commit hook")


def test_a_failing_commit_hook_makes_readyz_503_and_later_webhooks_fail_fast(dsn, monkeypatch, caplog):
    """The delivery whose hook failed is committed and acknowledged; then the writer is dead:
    the crash is logged with its exception, /readyz names it (503), and the next webhook gets a
    503 with Retry-After at once instead of waiting forever."""
    monkeypatch.setattr(Hub, "committed_here", failing_hook)  # the app's real hook, made to fail
    for name, value in relay_env(dsn).items():
        monkeypatch.setenv(name, value)
    app = create_app(load_settings(generate_missing=False), dsn)
    first, second = new_prediction_id(), new_prediction_id()

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with serving_app(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            accepted = await post(client, first)
            for _ in range(100):
                ready = await client.get("/readyz")
                if ready.status_code == 503:
                    break
                await asyncio.sleep(0.05)
            refused = await post(client, second)
            return accepted, ready, refused

    with caplog.at_level(logging.ERROR, logger="relay.supervisor"):
        accepted, ready, refused = asyncio.run(scenario())
    assert accepted.status_code == 200, accepted.text
    assert query(dsn, "SELECT seq FROM events WHERE prediction_id = $1", first)  # durable, as acknowledged
    assert ready.status_code == 503
    assert WRITER_TASK in ready.json()["reason"] and "RuntimeError" in ready.json()["reason"]
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "DATABASE_UNAVAILABLE"
    assert not query(dsn, "SELECT seq FROM events WHERE prediction_id = $1", second)
    crash = [r for r in caplog.records if WRITER_TASK in r.getMessage()]
    assert crash and crash[0].exc_info is not None and "commit hook" in str(crash[0].exc_info[1])


async def post(client: httpx.AsyncClient, prediction_id: str) -> httpx.Response:
    body = body_of({"id": prediction_id, "status": "starting"})
    headers = signed_headers(WEBHOOK_KEY, new_webhook_id(), body)
    return await client.post("/webhooks/replicate", content=body, headers=headers)


def test_the_hub_replay_loop_outlives_an_event_it_cannot_send(dsn, monkeypatch, caplog):
    """A replay whose dispatch fails is logged and skipped; the loop (and readiness) survive."""

    def failing_dispatch(self: Hub, rows: object, *, replayed: bool = False) -> None:
        raise RuntimeError("cannot render")

    monkeypatch.setattr(Hub, "dispatch", failing_dispatch)

    async def scenario() -> tuple[Supervisor, bool]:
        supervisor = Supervisor()
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3)
        hub = Hub(pool, lambda: asyncpg.connect(dsn), Vault(()))
        await hub.start(supervisor)
        await asyncio.wait_for(hub.listening.wait(), 10)
        async with pool.acquire() as conn:
            for _ in range(2):
                await conn.execute("SELECT pg_notify($1, '1')", store.REPLAY_CHANNEL)
        for _ in range(100):
            if sum("could not read" in r.getMessage() for r in caplog.records) == 2:
                break
            await asyncio.sleep(0.02)
        alive = all(not task.done() for task in hub._tasks)
        await hub.stop()
        await supervisor.stop()
        await pool.close()
        return supervisor, alive

    with caplog.at_level(logging.WARNING, logger="relay.fanout"):
        supervisor, alive = asyncio.run(scenario())
    assert sum("could not read" in r.getMessage() for r in caplog.records) == 2
    assert alive and supervisor.healthy()
