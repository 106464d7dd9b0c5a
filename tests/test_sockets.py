"""WS /predictions/{id}/ws and /events/ws against a real `relay serve`, with real websockets clients."""

from __future__ import annotations

import asyncio
import json
import signal
import socket

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from service.ops.simulate import lifecycle

from .streams import (
    flood,
    log_seqs,
    metric,
    post,
    post_async,
    processing,
    read_backlog,
    read_through,
    read_to_close,
    seqs,
    stream_url,
    subscribe,
    tiny_window_socket,
    token_for,
)
from .support import ADMIN_TOKEN, RelayProcess, new_prediction_id, relay_env

FLOOD = 300  # deliveries of 16 kB: more than socket buffers hold for a client that stopped reading


def test_backlog_then_caught_up_then_live_events_in_order(client, relay):
    """Stored events come first, then `caught_up`, then live events as they commit; 1000 at the end."""
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    stored = [post(client, body) for body in bodies[:3]]

    async def scenario() -> tuple[list[dict], int, list[dict], int | None]:
        async with subscribe(stream_url(relay, prediction_id)) as ws:
            backlog, caught_up = await read_backlog(ws)
            live_seqs = [await post_async(client, body) for body in bodies[3:]]
            live, code = await read_to_close(ws)
            assert seqs(live) == live_seqs
            return backlog, caught_up, live, code

    backlog, caught_up, live, code = asyncio.run(scenario())
    assert seqs(backlog) == stored and caught_up >= stored[-1]
    assert code == 1000
    events = backlog + live
    assert [e["prediction"] for e in events] == bodies
    assert [e["status"] for e in events] == [b["status"] for b in bodies]
    first = events[0]
    assert first["prediction_id"] == prediction_id and first["source"] == "webhook"
    assert first["replayed"] is False and first["webhook_id"].startswith("msg_")
    assert first["received_at"].endswith("Z")


def test_a_live_message_is_the_same_as_the_logs_for_a_late_reader(client, relay):
    """Events delivered live (handed from this process's writer to its hub) and the same events
    read back from the log by a client connecting afterwards are the same messages."""
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    bodies[1]["logs"] = "caf\u00e9 \u2615 naïve"  # non-ASCII, as raw UTF-8 in the body

    async def scenario() -> tuple[list[dict], list[dict]]:
        async with subscribe(stream_url(relay, prediction_id)) as ws:
            await read_backlog(ws)
            for body in bodies:
                await post_async(client, json.dumps(body, ensure_ascii=False).encode())
            live, _ = await read_to_close(ws)
        async with subscribe(stream_url(relay, prediction_id)) as late:
            stored, _ = await read_to_close(late)
        return live, [m for m in stored if m["type"] == "event"]

    live, stored = asyncio.run(scenario())
    assert len(live) == len(bodies) and live == stored
    assert live[1]["prediction"]["logs"] == "caf\u00e9 \u2615 naïve"


def test_resume_after_a_disconnect_gets_exactly_the_missing_events(client, relay):
    """A client that drops mid-stream and resumes with after= misses nothing and sees nothing twice."""
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)

    async def scenario() -> tuple[list[dict], list[dict], int | None]:
        async with subscribe(stream_url(relay, prediction_id)) as ws:
            await read_backlog(ws)
            sent = [await post_async(client, body) for body in bodies[:3]]
            first = await read_through(ws, sent[1])  # read two of the three, then drop
        for body in bodies[3:]:
            await post_async(client, body)
        async with subscribe(stream_url(relay, prediction_id, after=first[-1]["seq"])) as ws:
            rest, code = await read_to_close(ws)
        return first, rest, code

    first, rest, code = asyncio.run(scenario())
    assert code == 1000
    assert seqs(first) + seqs(rest) == log_seqs(relay.env["DATABASE_URL"], prediction_id)
    assert [e["prediction"] for e in first + rest if e["type"] == "event"] == bodies


def test_resuming_past_this_instances_cursor_repeats_nothing(client, relay):
    """A client that read further elsewhere (after= at the log's head) gets only newer events.
    (An after= beyond the head is refused: tests/test_params.py.)"""
    prediction_id = new_prediction_id()
    start = post(client, lifecycle(prediction_id)[0])
    other = new_prediction_id()
    after = max(post(client, lifecycle(other)[0]), post(client, processing(other, 1)))
    assert after == start + 2

    async def scenario() -> tuple[int, list[dict]]:
        async with subscribe(stream_url(relay, prediction_id, after=after)) as ws:
            backlog, caught_up = await read_backlog(ws)
            assert backlog == []
            sent = [await post_async(client, processing(prediction_id, step)) for step in range(4)]
            return caught_up, await read_through(ws, sent[-1])

    caught_up, live = asyncio.run(scenario())
    assert caught_up == after
    assert seqs(live) == log_seqs(relay.env["DATABASE_URL"], prediction_id, after=after)
    assert seqs(live) == [after + 1, after + 2, after + 3, after + 4]


def test_stream_of_a_finished_prediction_sends_the_backlog_and_closes_1000(client, relay):
    prediction_id = new_prediction_id()
    stored = [post(client, body) for body in lifecycle(prediction_id, "failed")]

    async def scenario() -> list[tuple[list[dict], int | None]]:
        results = []
        for after in (0, stored[-1]):
            async with subscribe(stream_url(relay, prediction_id, after=after)) as ws:
                results.append(await read_to_close(ws))
        return results

    (full, full_code), (resumed, resumed_code) = asyncio.run(scenario())
    assert seqs(full) == stored and full[-1]["type"] == "caught_up" and full_code == 1000
    assert [m["type"] for m in resumed] == ["caught_up"] and resumed_code == 1000


def test_all_events_stream_carries_every_prediction_and_outlives_terminal_events(client, relay):
    first, second = new_prediction_id(), new_prediction_id()

    async def scenario() -> tuple[list[dict], list[int]]:
        async with subscribe(stream_url(relay)) as ws:
            _, caught_up = await read_backlog(ws)
            sent = []
            for a, b in zip(lifecycle(first, "canceled"), lifecycle(second), strict=False):
                sent += [await post_async(client, a), await post_async(client, b)]
            sent.append(await post_async(client, lifecycle(second)[-1]))
            live = await read_through(ws, sent[-1])
            return live, [caught_up, *sent]

    live, (caught_up, *sent) = asyncio.run(scenario())
    assert seqs(live) == sent == log_seqs(relay.env["DATABASE_URL"], after=caught_up)
    assert {e["prediction_id"] for e in live} == {first, second}
    assert "canceled" in [e["status"] for e in live]  # the stream went on past a terminal event


def test_star_token_admin_token_and_bearer_header_are_accepted(client, relay):
    prediction_id = new_prediction_id()
    seq = post(client, lifecycle(prediction_id)[0])

    async def backlog(url: str, headers: dict | None = None) -> list[int]:
        async with subscribe(url, additional_headers=headers) as ws:
            return seqs((await read_backlog(ws))[0])

    async def scenario() -> list[list[int]]:
        path = f"{relay.ws_url}/predictions/{prediction_id}/ws"
        return [
            await backlog(stream_url(relay, prediction_id, token=token_for("*"))),
            await backlog(stream_url(relay, prediction_id, token=ADMIN_TOKEN)),
            await backlog(path, {"Authorization": f"Bearer {token_for(prediction_id)}"}),
            await backlog(path, {"Authorization": f"Bearer {ADMIN_TOKEN}"}),
        ]

    assert asyncio.run(scenario()) == [[seq]] * 4


REFUSALS = {
    "missing": lambda p: f"/predictions/{p}/ws",
    "garbage": lambda p: f"/predictions/{p}/ws?token=not-a-jwt",
    "bad signature": lambda p: f"/predictions/{p}/ws?token={token_for(p, key='another-key-' + 'z' * 20)}",
    "expired": lambda p: f"/predictions/{p}/ws?token={token_for(p, ttl=-30)}",
    "other prediction": lambda p: f"/predictions/{p}/ws?token={token_for(new_prediction_id())}",
    "all events, no token": lambda p: "/events/ws",
    "all events, subscriber token": lambda p: f"/events/ws?token={token_for('*')}",
    "all events, wrong admin token": lambda p: "/events/ws?token=" + ADMIN_TOKEN + "x",
}


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_tokens_are_refused_with_403_before_any_data(client, relay, case):
    """A refused handshake is an HTTP 403: no socket is opened, so no event can be sent."""
    prediction_id = new_prediction_id()
    post(client, lifecycle(prediction_id)[0])

    async def attempt() -> InvalidStatus:
        with pytest.raises(InvalidStatus) as refused:
            async with subscribe(relay.ws_url + REFUSALS[case](prediction_id)):
                pass
        return refused.value

    refusal = asyncio.run(attempt())
    assert refusal.response.status_code == 403
    assert prediction_id.encode() not in refusal.response.body


def test_a_bad_after_closes_the_socket_with_1008_and_a_reason(relay):
    async def attempt() -> tuple[list[dict], int | None, str | None]:
        async with subscribe(stream_url(relay) + "&after=-1") as ws:
            messages, code = await read_to_close(ws)
            return messages, code, ws.close_reason

    messages, code, reason = asyncio.run(attempt())
    assert messages == [] and code == 1008
    assert "after must be a non-negative integer" in reason


@pytest.fixture(scope="module")
def short_lived(postgres):
    """A server with a one-second ping, for keepalive and shutdown tests."""
    with RelayProcess(relay_env(postgres.new_database(), RELAY_WS_PING="1")) as process:
        yield process


def handshake_then_go_silent(relay: RelayProcess, prediction_id: str) -> socket.socket:
    """A peer that completes the handshake, then never reads or answers a ping again."""
    sock = socket.create_connection(("127.0.0.1", relay.port))
    path = stream_url(relay, prediction_id).removeprefix(relay.ws_url)
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    return sock


def test_pings_keep_idle_sockets_open_and_drop_dead_peers(short_lived):
    relay = short_lived
    prediction_id = new_prediction_id()
    with (
        httpx.Client(base_url=relay.url, timeout=30) as http,
        handshake_then_go_silent(relay, prediction_id),
    ):

        async def scenario() -> list[dict]:
            async with subscribe(stream_url(relay, prediction_id)) as ws:
                await read_backlog(ws)
                assert metric(http, "relay_subscribers") == 2
                await asyncio.sleep(4)  # four ping intervals: the silent peer misses its pongs
                assert metric(http, "relay_subscribers") == 1
                seq = await post_async(http, lifecycle(prediction_id)[0])
                return await read_through(ws, seq)

        live = asyncio.run(scenario())
    assert [e["status"] for e in live] == ["starting"]


def test_sigterm_closes_sockets_with_1001_and_exits_promptly(postgres):
    """SIGTERM: 1001 for every reader, and a client that stopped reading cannot hold up the exit."""
    prediction_id = new_prediction_id()
    with (
        RelayProcess(relay_env(postgres.new_database())) as relay,
        httpx.Client(base_url=relay.url, timeout=30) as http,
    ):

        async def scenario() -> tuple[list[int | None], float, int]:
            url = stream_url(relay, prediction_id)
            async with subscribe(url, sock=tiny_window_socket(relay.port), max_queue=1):
                readers = [await subscribe(u) for u in (url, stream_url(relay))]
                for ws in readers:
                    await read_backlog(ws)
                reading = [asyncio.create_task(read_to_close(ws, timeout=30)) for ws in readers]
                await flood(http, prediction_id, FLOOD)
                sent = metric(http, "relay_messages_sent_total")
                relay.proc.send_signal(signal.SIGTERM)
                closed = await asyncio.gather(*reading)
                # uvicorn alone would wait 10 s for the stuck socket to take its close frame
                returncode = await asyncio.to_thread(relay.proc.wait, 8)
                return [code for _, code in closed], sent, returncode

        codes, sent, returncode = asyncio.run(scenario())
        output = relay.read_output()
    assert sent < 3 * FLOOD, "the stuck client was not stuck: the test proves nothing"
    assert codes == [1001, 1001]
    assert returncode == 0 and "Traceback" not in output
