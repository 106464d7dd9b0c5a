"""The log's guarantees, checked at the database: append-only, seq visibility order, projection."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest

from service.core.statuses import Rank, rank, supersedes
from service.db import store
from service.ingest.committer import delivery_from
from service.ops.simulate import lifecycle

from .support import follow_log, new_prediction_id, new_webhook_id, post_webhook


def make_delivery(prediction_id: str, status: str = "processing") -> store.Delivery:
    body = lifecycle(prediction_id)[0] | {"status": status}
    import json

    return delivery_from(body, json.dumps(body).encode(), webhook_id=new_webhook_id(), source="webhook")


def run(coro):
    return asyncio.run(coro)


async def appended(dsn: str, deliveries: list[store.Delivery]) -> list[store.Appended]:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            return await store.append(conn, deliveries)
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "sql",
    ["UPDATE events SET status = 'failed'", "DELETE FROM events", "TRUNCATE events"],
)
def test_the_log_refuses_update_delete_and_truncate(dsn, sql):
    run(appended(dsn, [make_delivery(new_prediction_id())]))

    async def attempt() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(sql)
            return await conn.fetchval("SELECT count(*) FROM events WHERE status = 'processing'")
        finally:
            await conn.close()

    assert run(attempt()) == 1


def test_a_poller_following_seq_never_misses_a_row_under_concurrent_writers(dsn):
    """seq order is visibility order: a reader of `seq > cursor` never skips a late commit."""
    writers, batches_each = 8, 40

    async def writer() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for _ in range(batches_each):
                batch = [make_delivery(new_prediction_id()) for _ in range(random.randint(1, 5))]
                async with conn.transaction():
                    await store.append(conn, batch)
                    await asyncio.sleep(random.random() * 0.003)  # hold the commit open a little
        finally:
            await conn.close()

    async def scenario() -> tuple[list[int], list[int]]:
        done = asyncio.Event()
        reader = await asyncpg.connect(dsn)
        poller = asyncio.create_task(follow_log(reader.fetch, done))
        await asyncio.gather(*(writer() for _ in range(writers)))
        done.set()
        seen = await poller
        every = [r["seq"] for r in await reader.fetch("SELECT seq FROM events ORDER BY seq")]
        await reader.close()
        return seen, every

    seen, every = run(scenario())
    assert len(every) >= writers * batches_each
    assert seen == every


def test_concurrent_deliveries_for_one_prediction_all_land_and_the_state_is_right(relay):
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    bodies = bodies * 1  # starting, 3 processing, output, succeeded

    async def post_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
            from service.core.signatures import signed_headers

            from .support import WEBHOOK_KEY, body_of

            async def one(body: dict) -> httpx.Response:
                raw = body_of(body)
                headers = signed_headers(WEBHOOK_KEY, new_webhook_id(), raw)
                return await http.post("/webhooks/replicate", content=raw, headers=headers)

            return await asyncio.gather(*(one(b) for b in bodies))

    responses = run(post_all())
    assert all(r.status_code == 200 for r in responses)
    seqs = sorted(r.json()["seq"] for r in responses)
    assert len(set(seqs)) == len(bodies)
    admin = {"Authorization": "Bearer " + relay.env["RELAY_ADMIN_TOKEN"]}
    state = httpx.get(f"{relay.url}/predictions/{prediction_id}", headers=admin).json()
    assert state["status"] == "succeeded"
    assert state["event_count"] == len(bodies) and state["last_seq"] == seqs[-1]


def test_a_batch_with_a_repeated_webhook_id_stores_it_once(dsn):
    first = make_delivery(new_prediction_id())
    results = run(appended(dsn, [first, first, make_delivery(new_prediction_id())]))
    assert results[0].duplicate is False and results[1] == store.Appended(results[0].seq, True)
    assert results[2].duplicate is False and results[2].seq > results[0].seq


async def projection(dsn: str, prediction_id: str) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow("SELECT * FROM predictions WHERE prediction_id = $1", prediction_id)
    finally:
        await conn.close()


def test_projection_fold_keeps_the_first_terminal_and_the_newest_progress(dsn):
    """Within one batch the state is the first terminal event; the counts cover every event."""
    prediction_id = new_prediction_id()
    statuses = ["starting", "processing", "succeeded", "processing", "failed", "processing"]
    seqs = [r.seq for r in run(appended(dsn, [make_delivery(prediction_id, s) for s in statuses]))]
    state = run(projection(dsn, prediction_id))
    assert state["status"] == "succeeded" and state["state_seq"] == seqs[2]
    assert state["event_count"] == 6 and state["first_seq"] == seqs[0] and state["last_seq"] == seqs[-1]


def test_a_later_batch_moves_progress_forward_but_never_undoes_a_terminal_state(dsn):
    prediction_id = new_prediction_id()
    first = run(appended(dsn, [make_delivery(prediction_id, "starting")]))
    progress = run(appended(dsn, [make_delivery(prediction_id, "processing")]))
    assert run(projection(dsn, prediction_id))["state_seq"] == progress[0].seq
    done = run(appended(dsn, [make_delivery(prediction_id, "canceled")]))
    run(appended(dsn, [make_delivery(prediction_id, "processing"), make_delivery(prediction_id, "failed")]))
    state = run(projection(dsn, prediction_id))
    assert state["status"] == "canceled" and state["state_seq"] == done[0].seq
    assert state["event_count"] == 5 and state["first_seq"] == first[0].seq


def test_equal_rank_progress_in_separate_batches_moves_the_state_to_the_newer_event(dsn, client, admin):
    """`processing`, then a newer `processing` in a later batch: the newer one is the state (the
    projection's equal-rank rule, in SQL across batches, and what GET /predictions/{id} shows)."""
    prediction_id = new_prediction_id()
    older = make_delivery(prediction_id, "processing")
    run(appended(dsn, [older]))
    newer = run(appended(dsn, [make_delivery(prediction_id, "processing")]))
    state = run(projection(dsn, prediction_id))
    assert state["state_seq"] == newer[0].seq and state["event_count"] == 2

    served = new_prediction_id()
    bodies = [{"id": served, "status": "processing", "logs": f"step {n}"} for n in (1, 2)]
    for body in bodies:  # one at a time: separate group-commit batches
        assert post_webhook(client, body).status_code == 200
    assert admin.get(f"/predictions/{served}").json()["logs"] == "step 2"


def test_unknown_status_ranks_as_running_and_cannot_undo_a_terminal_state():
    assert rank("some-future-status") == Rank.RUNNING
    assert not supersedes(rank("some-future-status"), rank("succeeded"))
    assert supersedes(rank("processing"), rank("processing"))
    assert not supersedes(rank("canceled"), rank("succeeded"))


def test_received_at_is_the_arrival_time(client, relay):
    before = datetime.now(UTC)
    prediction = lifecycle(new_prediction_id())[0]
    post_webhook(client, prediction)

    async def fetch():
        conn = await asyncpg.connect(relay.env["DATABASE_URL"])
        try:
            return await conn.fetchrow(
                "SELECT received_at, webhook_timestamp FROM events WHERE prediction_id = $1",
                prediction["id"],
            )
        finally:
            await conn.close()

    row = run(fetch())
    assert before <= row["received_at"] <= datetime.now(UTC)
    assert abs((row["webhook_timestamp"] - before).total_seconds()) < 5
