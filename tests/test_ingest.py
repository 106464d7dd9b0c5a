"""Group commit under concurrency: acks after COMMIT, dedupe within and across batches, seq order."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import httpx

from service.core.signatures import signed_headers
from service.ops.simulate import lifecycle

from .support import WEBHOOK_KEY, follow_log, new_prediction_id, new_webhook_id

CONCURRENCY = 64
Sends = list[tuple[str, bytes]]


def deliveries(predictions: int) -> Sends:
    """Whole lifecycles, each delivery with its own webhook-id."""
    return [
        (new_webhook_id(), json.dumps(body).encode())
        for _ in range(predictions)
        for body in lifecycle(new_prediction_id())
    ]


async def burst(url: str, dsn: str, sends: Sends) -> tuple[list[dict], list[int], list[int]]:
    """POST all `sends` concurrently while a poller follows `seq > cursor`.

    Right after each 200 arrives, its row is looked up on another connection. Returns the
    answers (with whether the row was visible at ack time), the seqs the poller saw in order,
    and all seqs in the log at the end."""
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=8)
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

        async def post(webhook_id: str, body: bytes) -> dict:
            headers = signed_headers(WEBHOOK_KEY, webhook_id, body)
            response = await http.post("/webhooks/replicate", content=body, headers=headers)
            assert response.status_code == 200, response.text
            answer = response.json()
            visible = await pool.fetchval(
                "SELECT webhook_id = $2 FROM events WHERE seq = $1", answer["seq"], webhook_id
            )
            return {**answer, "webhook_id": webhook_id, "visible": visible}

        poller = asyncio.create_task(follow_log(pool.fetch, done))
        answers = await asyncio.gather(*(post(w, b) for w, b in sends))
        done.set()
        seen = await poller
    every = [r["seq"] for r in await pool.fetch("SELECT seq FROM events ORDER BY seq")]
    await pool.close()
    return answers, seen, every


def test_concurrent_deliveries_are_acked_after_commit_in_shared_transactions(relay):
    """Every 200 is already visible to other connections; concurrent rows share transactions."""
    sends = deliveries(40)
    dsn = relay.env["DATABASE_URL"]
    answers, _, _ = asyncio.run(burst(relay.url, dsn, sends))
    assert all(a["visible"] is True and a["duplicate"] is False for a in answers)
    assert len({a["seq"] for a in answers}) == len(sends)

    async def transactions() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            ids = [w for w, _ in sends]
            query = "SELECT count(DISTINCT xmin::text) FROM events WHERE webhook_id = ANY($1::text[])"
            return await conn.fetchval(query, ids)
        finally:
            await conn.close()

    assert asyncio.run(transactions()) < len(sends)


def test_concurrent_retries_store_each_delivery_once_and_agree_on_its_seq(relay):
    """Copies of a delivery, in one batch or across batches, add one row; one copy is 'new'."""
    originals = deliveries(20)
    sends = originals * 3  # every delivery three times, all in flight together
    answers, _, _ = asyncio.run(burst(relay.url, relay.env["DATABASE_URL"], sends))
    by_id: dict[str, list[dict]] = {}
    for answer in answers:
        by_id.setdefault(answer["webhook_id"], []).append(answer)
    for copies in by_id.values():
        assert len({c["seq"] for c in copies}) == 1
        assert sorted(c["duplicate"] for c in copies) == [False, True, True]
        assert all(c["visible"] for c in copies)


def test_a_poller_never_skips_a_seq_while_deliveries_are_group_committed(relay):
    """seq order is visibility order through the HTTP path too."""
    _, seen, every = asyncio.run(burst(relay.url, relay.env["DATABASE_URL"], deliveries(40)))
    assert seen == every
