"""Test support: a Postgres for the suite, fresh databases, and real `relay serve` processes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.core.signatures import signed_headers
from service.db import embedded, store
from service.ingest.committer import delivery_from
from service.ops.simulate import MODEL, lifecycle

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_KEY = b"relay-test-webhook-key-0123456789"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(WEBHOOK_KEY).decode()
ADMIN_TOKEN = "test-admin-token-" + "x" * 20
SUBSCRIBE_KEY = "test-subscribe-key-" + "y" * 20
_names = itertools.count()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


class Postgres:
    """The suite's server: DATABASE_URL if set, else a throwaway embedded cluster.

    `own=True` always starts a throwaway embedded cluster (for tests that stop or restart it).
    """

    def __init__(self, tmp: Path, *, own: bool = False):
        self.server = None
        if os.environ.get("DATABASE_URL") and not own:
            self.admin_dsn = os.environ["DATABASE_URL"]
        else:
            self.server = embedded.start(tmp, delete_on_exit=True)
            self.admin_dsn = embedded.dsn(self.server)

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def new_database(self, migrate: bool = True) -> str:
        """A fresh, empty database (migrated unless told otherwise) for one test or module."""
        import asyncio

        from service.db import database

        name = f"relay_test_{os.getpid()}_{next(_names)}"
        asyncio.run(self._admin(f'CREATE DATABASE "{name}"'))
        dsn = with_database(self.admin_dsn, name)
        if migrate:
            asyncio.run(database.migrate(dsn))
        return dsn

    def pg_ctl(self, *args: str) -> None:
        assert self.server is not None, "restarting Postgres needs the embedded server"
        embedded.pg_ctl(self.server, *args)

    def stop_server(self) -> None:
        self.pg_ctl("-w", "-m", "fast", "stop")

    def start_server(self) -> None:
        """Start the stopped cluster again with the wheel's options (Unix socket in pgdata only)."""
        assert self.server is not None
        pgdata = self.server.pgdata
        self.pg_ctl("-w", "-o", '-h ""', "-o", f"-k {pgdata}", "-l", str(pgdata / "log"), "start")


def query(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """Run one statement on its own connection and return its rows (tests read the log directly)."""
    import asyncio

    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def relay_env(dsn: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "REPLICATE_"))}
    env.update(
        DATABASE_URL=dsn,
        REPLICATE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        RELAY_ADMIN_TOKEN=ADMIN_TOKEN,
        RELAY_SUBSCRIBE_KEY=SUBSCRIBE_KEY,
        # The test receivers listen on loopback, which replays refuse by default (test_replay_guard).
        RELAY_REPLAY_PRIVATE="on",
        PYTHONUNBUFFERED="1",
        # No test fetches real output URLs (lifecycle() names replicate.delivery): the archive
        # tests turn it on against their own file server.
        RELAY_ARCHIVE="off",
    )
    env.update(extra)
    return env


class RelayProcess:
    """A real `relay serve` process on its own port."""

    def __init__(
        self,
        env: dict[str, str],
        port: int | None = None,
        args: tuple[str, ...] = (),
        *,
        program: tuple[str, ...] = (sys.executable, "-m", "service"),
        cwd: Path = ROOT,
    ):
        self.port = port or free_port()
        self.env = env
        self.args = args
        self.program = program  # how to run `relay` (another install's console script, say)
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> RelayProcess:
        self.proc = subprocess.Popen(
            [*self.program, "serve", "--port", str(self.port), *self.args],
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # Read the output as it comes: with the access log on, a busy server would otherwise fill
        # the pipe and block on its next log line.
        self._reader = threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay serve exited {self.proc.returncode}:\n{self.read_output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"relay serve did not become ready:\n{self.read_output()}")

    def _drain(self, stdout: IO[str]) -> None:
        for line in stdout:
            self._lines.append(line)
        stdout.close()

    @property
    def output(self) -> str:
        """What the process printed so far (all of it once it has exited and `read_output` ran)."""
        return "".join(self._lines)

    def read_output(self) -> str:
        if self.proc is not None and self.proc.poll() is not None and self._reader is not None:
            self._reader.join(10)
        return self.output

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.read_output()

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def new_prediction_id() -> str:
    return "p" + uuid.uuid4().hex[:25]


def new_webhook_id() -> str:
    return "msg_" + uuid.uuid4().hex


def body_of(prediction: dict | bytes) -> bytes:
    return prediction if isinstance(prediction, bytes) else json.dumps(prediction).encode()


def post_webhook(
    client: httpx.Client,
    prediction: dict | bytes,
    *,
    webhook_id: str | None = None,
    key: bytes = WEBHOOK_KEY,
    timestamp: int | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    body = body_of(prediction)
    signed = signed_headers(key, webhook_id or new_webhook_id(), body, timestamp)
    return client.post("/webhooks/replicate", content=body, headers={**signed, **(headers or {})})


def deliver_lifecycle(client: httpx.Client, prediction_id: str, outcome: str = "succeeded") -> list[int]:
    seqs = []
    for body in lifecycle(prediction_id, outcome):
        response = post_webhook(client, body)
        assert response.status_code == 200, response.text
        seqs.append(response.json()["seq"])
    return seqs


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@contextlib.contextmanager
def running_relay(dsn: str, **extra: str) -> Iterator[RelayProcess]:
    with RelayProcess(relay_env(dsn, **extra)) as relay:
        yield relay


SECRETS = (WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_"), ADMIN_TOKEN, SUBSCRIBE_KEY)


def assert_no_secret(text: str) -> None:
    """No configured secret appears in `text` (a log, an error body, metrics)."""
    leaked = [secret[:10] + "…" for secret in SECRETS if secret in text]
    assert not leaked, f"secrets in output: {leaked}"


async def follow_log(fetch: Callable[..., Awaitable[list]], done: asyncio.Event) -> list[int]:
    """The seqs a reader following `seq > cursor` sees, in order, until `done` and caught up."""
    seen: list[int] = []
    cursor = 0
    while True:
        finished = done.is_set()
        rows = await fetch("SELECT seq FROM events WHERE seq > $1 ORDER BY seq", cursor)
        seen.extend(r["seq"] for r in rows)
        cursor = rows[-1]["seq"] if rows else cursor
        if finished and not rows:
            return seen


def relay_on_terminal(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, bytes]:
    """Run `relay ARGS` with stderr on a pseudo-terminal (stdout piped); what the terminal showed."""
    primary, secondary = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "service", *args],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=secondary, text=True, timeout=60,
        )  # fmt: skip
        os.close(secondary)
        secondary = -1
        terminal = b""
        with contextlib.suppress(OSError):  # EIO once the terminal's last writer has gone
            while chunk := os.read(primary, 4096):
                terminal += chunk
    finally:
        os.close(primary)
        if secondary != -1:
            os.close(secondary)
    return done, terminal


# `relay` commands and the embedded postmaster they start.


def relay_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `relay ARGS` (as `python -m service`) to completion, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dev_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without any Relay setting: dev mode in `data_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "REPLICATE_", "DATABASE_"))}
    # RELAY_ARCHIVE=off: lifecycle() outputs name replicate.delivery, which no test may fetch.
    return {**env, "RELAY_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", "RELAY_ARCHIVE": "off", **extra}


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def alive(pid: int) -> bool:
    """Whether `pid` still runs; an exited process that its parent has not reaped yet (a zombie,
    state Z) has stopped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def postmaster_running(pgdata: Path) -> bool:
    return (pgdata / "postmaster.pid").exists() and alive(postmaster_pid(pgdata))


# Waiting.


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll `condition` every 0.1 s until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# Metrics.


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of `/metrics`, by name and sorted labels."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


METRICS = ('relay_deliveries_total{outcome="stored"}', "relay_ingest_seconds_count", "relay_subscribers")


def samples(text: str) -> dict[str, float]:
    """The METRICS samples of a Prometheus text page (0 when absent)."""
    found = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(found.get(name, 0)) for name in METRICS}


def merged(url: str) -> dict[str, float]:
    """What `/metrics` reports, from whichever worker answers (a fresh connection each time)."""
    return samples(httpx.get(url + "/metrics", headers={"Connection": "close"}).text)


def stored_deliveries(url: str) -> float:
    return merged(url)[METRICS[0]]


# Usage: a log written straight to the database at chosen arrival times.

PRICE = 0.0014  # USD per second of MODEL
VERSION_ONLY = "0123456789abcdef" * 4  # a bare version: names no model


class Log:
    """Appends deliveries straight through `store.append`, at chosen arrival times."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.pending: list[store.Delivery] = []

    def add(self, body: dict, at: datetime, *, source: str = "webhook", webhook_id: str | None = None) -> str:
        webhook_id = webhook_id or new_webhook_id()
        raw = json.dumps(body).encode()
        self.pending.append(delivery_from(body, raw, webhook_id=webhook_id, source=source, received_at=at))
        return webhook_id

    def commit(self) -> None:
        async def append_each() -> None:
            conn = await asyncpg.connect(self.dsn)
            try:
                for delivery in self.pending:  # one transaction each, like separate requests
                    async with conn.transaction():
                        await store.append(conn, [delivery])
            finally:
                await conn.close()

        asyncio.run(append_each())
        self.pending = []


def bodies(outcome: str, model: str | None = MODEL, predict_time: float | None = None) -> list[dict]:
    """A lifecycle whose model is `model` (None: only a version) and given predict_time."""
    result = []
    for body in lifecycle(new_prediction_id(), outcome):
        if model:
            body = {**body, "model": model}
        else:
            body = {k: v for k, v in body.items() if k != "model"} | {"version": VERSION_ONLY}
        if predict_time is not None and body["metrics"]:
            body["metrics"] = {**body["metrics"], "predict_time": predict_time}
        result.append(body)
    return result


@contextlib.asynccontextmanager
async def serving_app(app: object) -> AsyncIterator[str]:
    """A real uvicorn server for an app built in this process (lifespan included), on a free
    port of 127.0.0.1; yields its base URL. For tests that change the app before it runs."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it from starting
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
