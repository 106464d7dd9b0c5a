"""Faults under load, with real processes: Relay killed or stopped, Postgres restarted, dead clients.

The load generator records every webhook-id it sent and the ones that got a 2xx; afterwards the
log must hold every acknowledged delivery exactly once and nothing that was never sent.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import time
from datetime import UTC, datetime

import asyncpg
import httpx
import psutil

from .load import Load, Subscription, assert_log_matches, log_rows
from .support import ADMIN_TOKEN, RelayProcess, assert_no_secret, new_prediction_id, relay_env

SHUTDOWN_BOUND = 15.0  # uvicorn's graceful timeout (10 s) plus closing the pool


def test_kill_9_under_load_loses_no_acknowledged_delivery(postgres):
    """Every delivery acknowledged before a SIGKILL is in the log exactly once; nothing unsent is."""
    dsn = postgres.new_database()
    env = relay_env(dsn)
    first = RelayProcess(env).start()
    with Load(first.url) as load:
        load.wait_for_acks(random.randint(50, 300))
        first.stop(signal.SIGKILL)
        acked_before_restart = len(load.acked)
        with RelayProcess(env, port=first.port):
            load.wait_for_acks(acked_before_restart + 100)
            load.stop()
        assert_no_secret(first.output)
    assert load.statuses()[0] > 0, "the kill did not happen under load"
    assert set(load.statuses()) <= {0, 200}
    assert_log_matches(load, dsn)


def test_sigterm_under_load_exits_promptly_and_loses_no_acknowledged_delivery(postgres):
    """In-flight deliveries either commit and get a 2xx or get no 2xx; the process exits in time."""
    dsn = postgres.new_database()
    relay = RelayProcess(relay_env(dsn)).start()
    with Load(relay.url) as load:
        load.wait_for_acks(150)
        started = time.monotonic()
        code = relay.stop(signal.SIGTERM, timeout=SHUTDOWN_BOUND + 5)
        elapsed = time.monotonic() - started
        time.sleep(0.2)  # let the senders see the closed port
    assert code == 0 and elapsed < SHUTDOWN_BOUND, (code, elapsed)
    assert "Traceback" not in relay.output
    assert_no_secret(relay.output)
    assert load.statuses()[0] > 0, "the shutdown did not happen under load"
    assert set(load.statuses()) <= {0, 200, 503}
    assert_log_matches(load, dsn)


async def _listener_since(dsn: str, moment: datetime) -> bool:
    """Whether a LISTEN connection (idle after LISTEN, or its liveness probe) opened after `moment`."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_start > $1 AND query IN ('LISTEN \"relay_events\"', 'SELECT 1')",
            moment,
        )
    finally:
        await conn.close()


def wait_for_listener(dsn: str, moment: datetime, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not asyncio.run(_listener_since(dsn, moment)):
        assert time.monotonic() < deadline, "the LISTEN connection did not come back"
        time.sleep(0.1)


def test_postgres_restart_under_load(own_postgres):
    """While Postgres is down deliveries get 503 + Retry-After (never a 500 or a hang); Relay
    recovers without a restart, loses nothing acknowledged, and subscribers end with the log."""
    postgres = own_postgres
    dsn = postgres.new_database()
    predictions = [new_prediction_id() for _ in range(3)]
    with RelayProcess(relay_env(dsn)) as relay:
        subscribers = [Subscription(relay.ws_url, p) for p in predictions]
        subscribers.append(Subscription(relay.ws_url))
        with Load(relay.url, predictions=predictions) as load:
            load.wait_for_acks(60)
            postgres.pg_ctl("-m", "immediate", "restart")
            load.wait_for_acks(len(load.acked) + 60)

            postgres.pg_ctl("-m", "immediate", "stop")
            down_from = time.monotonic()
            time.sleep(0.5)
            reads_while_down = [
                httpx.get(relay.url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=15)
                for path in ("/admin/events", f"/predictions/{predictions[0]}", "/readyz")
            ]
            time.sleep(1.5)
            down_until = time.monotonic()
            restarted_at = datetime.now(UTC)
            postgres.start_server()
            load.wait_for_acks(len(load.acked) + 60)
        wait_for_listener(dsn, restarted_at)
        assert httpx.get(relay.url + "/readyz").status_code == 200

        assert [r.status_code for r in reads_while_down] == [503, 503, 503]
        assert all(r.headers.get("retry-after") for r in reads_while_down[:2])
        assert set(load.statuses()) <= {200, 503}, load.statuses()
        assert all(o.retry_after for o in load.outcomes if o.status == 503)
        while_down = [o.status for o in load.outcomes if down_from + 0.5 < o.at < down_until]
        assert while_down and set(while_down) == {503}
        rows = assert_log_matches(load, dsn)
        for subscriber in subscribers:
            wanted = subscriber.prediction_id
            subscriber.wait_for([r["seq"] for r in rows if wanted in (None, r["prediction_id"])])
            subscriber.close()
    assert "Traceback" not in relay.output
    assert_no_secret(relay.output)


def dead_reader(port: int, path: str) -> socket.socket:
    """A WebSocket client that sends the handshake request and then never reads a byte."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET {path}?token={ADMIN_TOKEN} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
    )
    return sock


def subscriber_count(relay: RelayProcess) -> float:
    text = httpx.get(relay.url + "/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("relay_subscribers "))
    return float(line.split()[1])


def test_dead_readers_neither_starve_others_nor_grow_memory(postgres):
    """500 sockets that never read: 50 normal subscribers still get every event, and Relay's
    memory stays bounded. 20 of the dead sockets watch a prediction sent 160 events of 128 KiB
    (20 MiB each, far past the ~4 MiB the kernel buffers per socket): without backpressure
    Relay would buffer ~300 MiB for them; with it, each holds one transport buffer at most."""
    dsn = postgres.new_database()
    small, big = [new_prediction_id() for _ in range(3)], new_prediction_id()
    with RelayProcess(relay_env(dsn)) as relay:
        dead = [dead_reader(relay.port, f"/predictions/{small[i % 3]}/ws") for i in range(480)]
        dead += [dead_reader(relay.port, f"/predictions/{big}/ws") for _ in range(20)]
        normal = [Subscription(relay.ws_url, small[i % 3]) for i in range(45)]
        normal += [Subscription(relay.ws_url) for _ in range(5)]
        deadline = time.monotonic() + 10
        while subscriber_count(relay) < 550:
            assert time.monotonic() < deadline, "the dead readers were not all subscribed"
            time.sleep(0.1)
        process = psutil.Process(relay.proc.pid)
        rss_before = process.memory_info().rss
        with (
            Load(relay.url, predictions=small, pad=2500) as load,
            Load(relay.url, workers=2, predictions=[big], pad=128 * 1024) as big_load,
        ):
            big_load.wait_for_acks(160, timeout=60)
            load.wait_for_acks(300, timeout=60)
        rows = log_rows(dsn)
        for subscriber in normal:
            wanted = subscriber.prediction_id
            subscriber.wait_for([r["seq"] for r in rows if wanted in (None, r["prediction_id"])])
        growth = process.memory_info().rss - rss_before
        assert growth < 96 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB"
        for subscriber in normal:
            subscriber.close()
        for sock in dead:
            sock.close()
