"""The scheduler's rules for creates Replicate did not clearly answer, on a real database."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg

from service.batches import store as batches
from service.batches.links import ItemRef, link_key
from service.batches.requests import batch_request
from service.batches.scheduler import Scheduler
from service.core.errors import RelayError, error_class
from service.db.vault import Vault

from .batch_support import qwen_inputs
from .fake_replicate import QWEN

WEBHOOK_URL = "http://127.0.0.1:9/webhooks/replicate"
ProcessingError = error_class("ProcessingError", 502, "PROCESSING_ERROR")
NetworkError = error_class("NetworkError", 502, "NETWORK_ERROR")


class Reply:
    def __init__(self, data: dict[str, Any]):
        self.data = data


class Upstream:
    """Answers each create with the next scripted error, then with a new prediction."""

    def __init__(self, *errors: RelayError):
        self.errors = list(errors)
        self.creates: list[dict[str, Any]] = []

    async def create(self, path: str, payload: dict[str, Any]) -> Reply:
        self.creates.append(payload)
        if self.errors:
            raise self.errors.pop(0)
        return Reply({"id": f"p{len(self.creates)}", "status": "starting"})

    async def cancel(self, prediction_id: str) -> Reply:
        return Reply({"id": prediction_id, "status": "canceled"})


async def new_batch(pool: asyncpg.Pool, items: int, vault: Vault | None = None) -> str:
    request = batch_request({"model": QWEN, "inputs": qwen_inputs(items), "concurrency": 5}, WEBHOOK_URL)
    async with pool.acquire() as conn:
        return (await batches.insert_batch(conn, "admin", request, vault or Vault()))["id"]


async def statuses(pool: asyncpg.Pool, batch_id: str) -> list[tuple[str, str | None]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT status, error_code FROM batch_items WHERE batch_id = $1 ORDER BY index", batch_id
        )
    return [(row["status"], row["error_code"]) for row in rows]


async def step(scheduler: Scheduler) -> None:
    await scheduler.step_all()
    await scheduler.drain()


def test_an_unanswered_create_is_never_resent_and_gives_up_as_unknown(dsn):
    """A 5xx leaves the item `creating`, later `failed` (CREATE_OUTCOME_UNKNOWN); a late delivery binds it."""

    async def run() -> None:
        async with asyncpg.create_pool(dsn, min_size=1, max_size=4) as pool:
            upstream = Upstream(ProcessingError("Replicate failed with 500"))
            scheduler = Scheduler(pool, upstream, link_key("k"), WEBHOOK_URL, unknown_after=0.3)
            batch_id = await new_batch(pool, 1)
            await step(scheduler)
            await step(scheduler)
            assert await statuses(pool, batch_id) == [("creating", None)]
            await asyncio.sleep(0.4)
            await step(scheduler)
            assert await statuses(pool, batch_id) == [("failed", "CREATE_OUTCOME_UNKNOWN")]
            assert len(upstream.creates) == 1  # never sent again
            async with pool.acquire() as conn:
                owner = await batches.bind(conn, ItemRef(batch_id, 0), "p-late")
            assert owner == "admin" and await statuses(pool, batch_id) == [("submitted", None)]

    asyncio.run(run())


def test_a_create_that_never_connected_goes_back_to_pending_and_is_sent_once(dsn):
    async def run() -> None:
        async with asyncpg.create_pool(dsn, min_size=1, max_size=4) as pool:
            upstream = Upstream(NetworkError("cannot reach Replicate's API (ConnectError)"))
            scheduler = Scheduler(pool, upstream, link_key("k"), WEBHOOK_URL)
            batch_id = await new_batch(pool, 1)
            await step(scheduler)
            assert await statuses(pool, batch_id) == [("pending", None)]
            await asyncio.sleep(1.1)  # the batch waits a second before trying again
            await step(scheduler)
            assert await statuses(pool, batch_id) == [("submitted", None)]
            assert [c["input"] for c in upstream.creates] == qwen_inputs(1) * 2

    asyncio.run(run())


def test_with_encryption_waiting_inputs_are_sealed_until_their_create(dsn):
    """RELAY_ENCRYPTION_KEY: no waiting input is stored in clear (no prompt, no image URL), each
    create still sends the exact input, rotation re-seals what waits so the old key can go, and
    an input whose key is gone fails its item with the reason, never the batch."""
    old, new = os.urandom(32), os.urandom(32)

    async def stored(pool: asyncpg.Pool, batch_id: str) -> list[asyncpg.Record]:
        async with pool.acquire() as conn:
            return await conn.fetch(
                "SELECT input, input_sealed, kek_id FROM batch_items WHERE batch_id = $1 ORDER BY index",
                batch_id,
            )

    async def run() -> None:
        async with asyncpg.create_pool(dsn, min_size=1, max_size=4) as pool:
            batch_id = await new_batch(pool, 3, Vault([old]))
            waiting = await stored(pool, batch_id)
            assert all(row["input"] is None and row["kek_id"] == Vault([old]).current_id for row in waiting)
            assert not any(b"blue" in row["input_sealed"] or b"example.com" in row["input_sealed"]
                           for row in waiting)  # fmt: skip
            async with pool.acquire() as conn:
                assert await batches.reseal_inputs(conn, Vault([new, old])) == 3
            orphan = await new_batch(pool, 1, Vault([old]))  # submitted by an instance not yet told
            assert {row["kek_id"] for row in await stored(pool, batch_id)} == {Vault([new]).current_id}

            upstream = Upstream()
            await step(Scheduler(pool, upstream, link_key("k"), WEBHOOK_URL, vault=Vault([new])))
            sent = sorted((c["input"] for c in upstream.creates), key=lambda values: values["prompt"])
            assert sent == qwen_inputs(3)
            assert all(
                row["input_sealed"] is None and row["kek_id"] is None for row in await stored(pool, batch_id)
            )
            assert await statuses(pool, orphan) == [("failed", "INPUT_UNREADABLE")]
            async with pool.acquire() as conn:
                error = await conn.fetchval("SELECT error FROM batch_items WHERE batch_id = $1", orphan)
            assert "RELAY_ENCRYPTION_KEY" in error

    asyncio.run(run())


def test_a_batch_stream_remembers_a_bounded_number_of_other_predictions(dsn, monkeypatch):
    """A batch page left open on a busy server: its own predictions are always recognised, and
    it remembers at most OUTSIDERS_KEPT others (memory stays flat however many go by)."""
    from types import SimpleNamespace

    from service.web.routes import batches as batch_routes

    monkeypatch.setattr(batch_routes, "OUTSIDERS_KEPT", 50)

    async def run() -> None:
        async with asyncpg.create_pool(dsn, min_size=1, max_size=2) as pool:
            batch_id = await new_batch(pool, 2)
            await step(Scheduler(pool, Upstream(), link_key("k"), WEBHOOK_URL))  # creates p1 and p2
            stream = batch_routes.BatchStream(None, SimpleNamespace(pool=pool), None, batch_id)  # type: ignore[arg-type]
            others = [f"other-{n}" for n in range(500)]
            assert not any([await stream._member(p) for p in others])
            assert [await stream._member(own) for own in ("p1", "p2")] == [True, True]
            assert len(stream.outsiders) == 50 and others[-1] in stream.outsiders
            assert await stream._member(others[0]) is False  # forgotten, looked up again: still not

    asyncio.run(run())
