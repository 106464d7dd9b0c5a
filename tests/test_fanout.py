"""The hub: catch-up races, several instances on one database, Postgres restarts, slow clients."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx

from service.ops.simulate import lifecycle

from .streams import (
    bulky,
    log_seqs,
    metric,
    post,
    post_async,
    processing,
    read_backlog,
    read_through,
    read_to_close,
    receive,
    seqs,
    stream_url,
    subscribe,
    tiny_window_socket,
)
from .support import RelayProcess, new_prediction_id, new_webhook_id, post_webhook, relay_env

SUBSCRIBERS = 200
POSTING_THREADS = 3


def assert_one_caught_up_between_backlog_and_live(messages: list[dict]) -> None:
    kinds = [m["type"] for m in messages]
    assert kinds.count("caught_up") == 1, kinds
    boundary = messages[kinds.index("caught_up")]["seq"]
    before, after = seqs(messages[: kinds.index("caught_up")]), seqs(messages[kinds.index("caught_up") :])
    assert all(seq <= boundary for seq in before) and all(seq > boundary for seq in after)


def test_events_committed_during_catch_up_are_neither_lost_nor_repeated(relay):
    """Subscribers joining while deliveries commit get every event once, in seq order."""
    predictions = [new_prediction_id() for _ in range(4)]
    sentinel = new_prediction_id()  # its one event, posted last, ends the all-events streams
    acknowledged: list[int] = []
    stop = threading.Event()

    def keep_posting(worker: int) -> None:
        with httpx.Client(base_url=relay.url, timeout=30) as http:
            step = 0
            while not stop.is_set():
                acknowledged.append(post(http, processing(predictions[(step + worker) % 4], step)))
                step += 1

    async def watch(rng: random.Random) -> tuple[str | None, int, list[dict], int | None]:
        prediction = rng.choice([*predictions, None])
        after = rng.choice([0, rng.choice(acknowledged), max(acknowledged)])
        async with subscribe(stream_url(relay, prediction, after=after)) as ws:
            if prediction is not None:
                messages, code = await read_to_close(ws, timeout=60)
                return prediction, after, messages, code
            messages = [await receive(ws)]
            while messages[-1].get("prediction_id") != sentinel:
                messages.append(await receive(ws))
            return None, after, messages, None

    async def scenario() -> list[tuple[str | None, int, list[dict], int | None]]:
        with httpx.Client(base_url=relay.url, timeout=30) as http:
            for prediction in predictions:
                acknowledged.append(await post_async(http, lifecycle(prediction)[0]))
            threads = [threading.Thread(target=keep_posting, args=(n,)) for n in range(POSTING_THREADS)]
            for thread in threads:
                thread.start()
            rng = random.Random(3)
            watchers = []
            for _ in range(SUBSCRIBERS):
                watchers.append(asyncio.create_task(watch(rng)))
                await asyncio.sleep(rng.uniform(0, 0.03))
            await asyncio.sleep(0.3)
            stop.set()
            for thread in threads:
                await asyncio.to_thread(thread.join)
            for prediction in predictions:
                await post_async(http, lifecycle(prediction)[-1])
            await post_async(http, lifecycle(sentinel)[0])
            return await asyncio.gather(*watchers)

    results = asyncio.run(scenario())
    dsn = relay.env["DATABASE_URL"]
    straddling = 0
    for prediction, after, messages, code in results:
        expected = log_seqs(dsn, prediction, after)
        if prediction is None:
            expected = expected[: expected.index(seqs(messages)[-1]) + 1]
        else:
            assert code == 1000
        assert seqs(messages) == expected
        assert_one_caught_up_between_backlog_and_live(messages)
        kinds = [m["type"] for m in messages]
        straddling += kinds[0] == "event" and kinds[-1] == "event"
    assert straddling >= SUBSCRIBERS // 4, "too few subscribers joined mid-stream for the test to mean much"


def test_a_webhook_posted_to_one_instance_reaches_subscribers_of_another(relay, client):
    """Two processes, one database: each delivers every event to its own subscribers."""
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    with RelayProcess(relay.env) as other:

        async def scenario() -> tuple[list[dict], int | None, list[dict], list[dict], int | None]:
            async with (
                subscribe(stream_url(other, prediction_id)) as far,
                subscribe(stream_url(relay, prediction_id)) as near,
            ):
                await read_backlog(far)
                await read_backlog(near)
                sent = [await post_async(client, body) for body in bodies[:3]]
                first_half = await read_through(near, sent[-1])
            async with subscribe(stream_url(other, prediction_id, after=sent[-1])) as resumed:
                for body in bodies[3:]:
                    await post_async(client, body)
                rest, resumed_code = await read_to_close(resumed)
            async with subscribe(stream_url(other, prediction_id)) as whole:
                everything, code = await read_to_close(whole)
            return everything, code, first_half, rest, resumed_code

        everything, code, first_half, rest, resumed_code = asyncio.run(scenario())
    stored = log_seqs(relay.env["DATABASE_URL"], prediction_id)
    assert len(stored) == len(bodies)
    assert seqs(everything) == stored and code == 1000
    assert seqs(first_half) + seqs(rest) == stored and resumed_code == 1000


def test_an_acknowledged_event_is_in_the_backlog_of_any_instance(relay, client):
    """A 200 from one instance means the event is in the backlog of a subscriber on another, even
    one connecting immediately after, before that instance's hub has read it."""
    prediction_id = new_prediction_id()
    with RelayProcess(relay.env) as other:

        async def scenario() -> list[tuple[int, list[int], int]]:
            seen = []
            for step in range(30):
                seq = await post_async(client, processing(prediction_id, step))
                async with subscribe(stream_url(other, prediction_id, after=seq - 1)) as ws:
                    backlog, caught_up = await read_backlog(ws)
                seen.append((seq, seqs(backlog), caught_up))
            return seen

        seen = asyncio.run(scenario())
    assert all(backlog == [seq] and caught_up >= seq for seq, backlog, caught_up in seen), seen


def post_until_stored(http: httpx.Client, body: dict, timeout: float = 30) -> int:
    """Deliver like Replicate does: the same webhook-id again after a 503 or a refused connection."""
    webhook_id, deadline = new_webhook_id(), time.monotonic() + timeout
    while True:
        try:
            response = post_webhook(http, body, webhook_id=webhook_id)
            if response.status_code == 200:
                return response.json()["seq"]
            assert response.status_code == 503, response.text
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the delivery was never stored"
        time.sleep(0.2)


def test_subscribers_miss_nothing_across_postgres_outages(own_postgres):
    """While the database is down a new subscriber is closed with 1011 (it retries), the connected
    ones wait; after a stop/start and a crash restart, the hub listens again and catches up."""
    postgres = own_postgres
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    with (
        RelayProcess(relay_env(postgres.new_database())) as relay,
        httpx.Client(base_url=relay.url, timeout=30) as http,
    ):

        async def scenario() -> tuple:
            async with (
                subscribe(stream_url(relay, prediction_id)) as one,
                subscribe(stream_url(relay)) as every,
            ):
                await read_backlog(one)
                _, start = await read_backlog(every)
                before = [await post_async(http, body) for body in bodies[:2]]
                everyone = await read_through(every, before[-1])
                await asyncio.to_thread(postgres.stop_server)
                async with subscribe(stream_url(relay, prediction_id)) as late:
                    refused = await read_to_close(late)
                await asyncio.to_thread(postgres.start_server)
                between = await asyncio.to_thread(post_until_stored, http, bodies[2])
                everyone += await read_through(every, between)
                await asyncio.to_thread(postgres.pg_ctl, "-w", "-m", "immediate", "restart")
                after = [await asyncio.to_thread(post_until_stored, http, body) for body in bodies[3:]]
                mine, code = await read_to_close(one)
                return mine, code, start, everyone + await read_through(every, after[-1]), refused

        mine, code, start, everyone, refused = asyncio.run(scenario())
        dsn = relay.env["DATABASE_URL"]
        stored, everything = log_seqs(dsn, prediction_id), log_seqs(dsn, after=start)
    assert refused == ([], 1011)
    assert len(stored) == len(bodies) and code == 1000
    assert seqs(mine) == stored
    assert seqs(everyone) == everything


PROMPTLY = 5.0  # seconds: a liveness bound for one event to reach the reader, not a speed target
QUEUE = 64  # RELAY_WS_QUEUE of the slow-client test


async def read_each_until_a_slow_close(
    http: httpx.Client, reader, prediction_id: str
) -> tuple[list[dict], int]:
    """Post large, incompressible deliveries one at a time, the reader receiving each before the
    next is posted, until the server reports closing a slow client. Returns what the reader got,
    and how many of those it got while that client was still subscribed (all but the last round)."""
    received: list[dict] = []
    for step in range(3000):
        seq = await post_async(http, bulky(prediction_id, step))
        while_open = len(received)
        received += await asyncio.wait_for(read_through(reader, seq), PROMPTLY)
        if metric(http, "relay_slow_client_closes_total") > 0:
            return received, while_open
    raise AssertionError("the client that never reads was never closed")


def test_a_client_that_never_reads_is_closed_1013_and_others_get_everything(postgres):
    """One stuck socket overflows its own bounded queue; meanwhile a reader of the same prediction
    receives each event before the next is posted, and the stuck client resumes with after=."""
    prediction_id = new_prediction_id()
    with (
        RelayProcess(relay_env(postgres.new_database(), RELAY_WS_QUEUE=str(QUEUE))) as relay,
        httpx.Client(base_url=relay.url, timeout=30) as http,
    ):
        url = stream_url(relay, prediction_id)

        async def scenario() -> tuple[tuple[list[dict], int], tuple[list[dict], int | None], ...]:
            async with (
                subscribe(url, sock=tiny_window_socket(relay.port), max_queue=1) as stuck,
                subscribe(url) as reader,
            ):
                await read_backlog(reader)
                promptly = await read_each_until_a_slow_close(http, reader, prediction_id)
                for body in lifecycle(prediction_id)[-2:]:
                    await post_async(http, body)
                stopped = await read_to_close(stuck)
                rest_of_reader = await read_to_close(reader)
            async with subscribe(stream_url(relay, prediction_id, after=seqs(stopped[0])[-1])) as resumed:
                return promptly, rest_of_reader, stopped, await read_to_close(resumed)

        (promptly, while_open), (read, code), (stuck, stuck_code), (rest, rest_code) = asyncio.run(scenario())
        assert metric(http, "relay_slow_client_closes_total") == 1
    stored = log_seqs(relay.env["DATABASE_URL"], prediction_id)
    # At its close the stuck client had QUEUE events queued that the reader had already received.
    assert while_open >= QUEUE
    assert seqs(promptly) + seqs(read) == stored and code == 1000
    assert stuck_code == 1013 and seqs(stuck) == stored[: len(seqs(stuck))]
    assert seqs(stuck) + seqs(rest) == stored and rest_code == 1000
