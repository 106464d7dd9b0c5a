"""`relay batch submit FILE.jsonl` and `relay batch status ID`: batches through Relay's own API.

They call a running Relay (`--url`, default RELAY_PUBLIC_URL or http://HOST:PORT) with the
admin token (RELAY_ADMIN_TOKEN, or the dev secret), like `relay tail`. `submit` follows the
batch's WebSocket for a progress bar and exits 0 when every item succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import websockets

from service.cli.progress import Progress
from service.core.errors import ConfigError
from service.core.settings import tool_settings
from service.core.statuses import TERMINAL_STATUSES
from service.ops.tail import ws_base

SETTLE_SECONDS = 10.0
RECONNECT_DELAY = 0.5
RECONNECT_FOR = 120.0  # a restart or deploy of Relay is shorter; the batch itself goes on anyway
POLICY_VIOLATION = 1008  # Relay refuses this stream (unknown batch, token): reconnecting cannot help
REFRESH_EVERY = 30.0  # a GET now and then counts items that end without an event (refused creates)
INDEX_IN_MESSAGE = re.compile(r"^inputs\[(\d+)\]")
BATCH_ID = re.compile(r"^b_[0-9a-f]{32}$")


def not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def json_line(line: str) -> Any:
    """One line's JSON value; ValueError also for what Python's json reads but JSON cannot carry
    (NaN, Infinity, a number too large for a double, an unpaired UTF-16 surrogate), which the
    request would otherwise fail to encode with a traceback."""
    value = json.loads(line, parse_constant=not_json)
    json.dumps(value, allow_nan=False, ensure_ascii=False).encode()  # UnicodeEncodeError is a ValueError
    return value


def read_inputs(path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Each non-blank line's JSON object, and its line number; a broken line is a one-line error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {path}: {type(error).__name__}") from None
    inputs, lines = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json_line(line)
        except (ValueError, RecursionError):
            raise ConfigError(f"{path} line {number} is not valid JSON; one input object a line") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{path} line {number} is not a JSON object; one input object a line")
        inputs.append(value)
        lines.append(number)
    if not inputs:
        raise ConfigError(f"{path} holds no input; one JSON object a line")
    return inputs, lines


def refusal(
    response: httpx.Response, path: str, lines: list[int], what: str = "refused the batch"
) -> ConfigError:
    """Relay's error as one line; an input named by index is named by its line in the file."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}"
    if match := INDEX_IN_MESSAGE.match(message):
        index = int(match.group(1))
        if index < len(lines):
            message = f"{path} line {lines[index]}{message[match.end() :]}"
    return ConfigError(f"Relay {what}: {message}")


def ended(counts: dict[str, int]) -> int:
    return sum(n for status, n in counts.items() if status in TERMINAL_STATUSES)


def summary_line(batch: dict[str, Any], seconds: float) -> str:
    counts = batch["counts"]
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return f"batch {batch['id']} {batch['status']}: {batch['total']} item(s), {parts} in {seconds:.1f}s"


class BatchClient:
    def __init__(self, base_url: str, token: str):
        self.base_url = base_url.rstrip("/")
        self.done = 0  # items ended, as far as the socket (and a GET now and then) showed
        self.after = 0  # the last seq the socket sent: where to resume after a lost connection
        self.http = httpx.AsyncClient(
            base_url=self.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )

    async def get(self, batch_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/api/batches/{batch_id}", params={"limit": 1})
        if response.status_code != 200:
            raise refusal(response, "", [], what=f"answered {response.status_code}")
        return dict(response.json())

    async def follow(self, batch: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Follow the batch's socket until Relay closes it with 1000 (every item ended); the final
        batch. A socket lost otherwise (Relay restarted, a network blip) is opened again from the
        last seq seen, for up to RECONNECT_FOR seconds without a connection."""
        self.done, self.after = ended(batch["counts"]), 0
        lost_since: float | None = None
        while True:
            try:
                code, reason = await self._watch(batch, progress)
                lost_since = None
            except websockets.InvalidStatus as error:  # an HTTP answer instead of the socket
                answered = error.response.status_code
                if 400 <= answered < 500:  # refused (token, origin): asking again cannot help
                    raise ConfigError(
                        f"Relay refused the stream of batch {batch['id']} (HTTP {answered})"
                    ) from None
                code, reason = None, f"HTTP {answered}"
                lost_since = lost_since or time.monotonic()
            except (OSError, TimeoutError, websockets.InvalidHandshake) as error:
                code, reason = None, type(error).__name__
                lost_since = lost_since or time.monotonic()
            if code == 1000:
                break
            if code == POLICY_VIOLATION:
                raise ConfigError(f"Relay closed the stream of batch {batch['id']}: {reason}")
            if lost_since is not None and time.monotonic() - lost_since > RECONNECT_FOR:
                see = f"relay batch status {batch['id']}"
                raise ConfigError(f"lost Relay at {self.base_url} ({reason}); the batch goes on: {see}")
            await asyncio.sleep(RECONNECT_DELAY)
            with contextlib.suppress(ConfigError, httpx.HTTPError):  # items that ended meanwhile
                self.done = ended((await self.get(batch["id"]))["counts"])
                progress.set(self.done, batch["total"])
        final = await self.settled(batch["id"])
        progress.set(ended(final["counts"]), final["total"])
        return final

    async def _watch(self, batch: dict[str, Any], progress: Progress) -> tuple[int | None, str]:
        """Count terminal events on one connection of the batch's socket; its close code and reason."""
        query = urlencode({"token": batch["relay"]["token"], "after": self.after})
        url = f"{ws_base(self.base_url)}/batches/{batch['id']}/ws?{query}"
        refreshed = time.monotonic()
        async with websockets.connect(url, max_size=None) as socket:
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    try:
                        message = json.loads(await asyncio.wait_for(socket.recv(), REFRESH_EVERY))
                    except TimeoutError:
                        message = {}
                    if message.get("type") in ("event", "caught_up") and not message.get("replayed"):
                        self.after = max(self.after, int(message.get("seq") or 0))
                    terminal = message.get("status") in TERMINAL_STATUSES and not message.get("replayed")
                    if message.get("type") == "event" and terminal:
                        self.done = min(self.done + 1, batch["total"])
                    if time.monotonic() - refreshed >= REFRESH_EVERY:
                        with contextlib.suppress(ConfigError, httpx.HTTPError):
                            self.done = ended((await self.get(batch["id"]))["counts"])
                        refreshed = time.monotonic()
                    progress.set(self.done, batch["total"])
        return socket.close_code, socket.close_reason or ""

    async def settled(self, batch_id: str) -> dict[str, Any]:
        """The batch once its status says it ended: the socket closes when the last item's event
        is committed, and the scheduler marks the batch a moment later, in its own transaction."""
        deadline = time.monotonic() + SETTLE_SECONDS
        while (batch := await self.get(batch_id))["status"] == "running" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return batch


async def submit(args: argparse.Namespace, base_url: str, token: str) -> int:
    inputs, lines = read_inputs(args.file)
    body: dict[str, Any] = {"inputs": inputs, "concurrency": args.concurrency}
    body.update({"model": args.model} if args.model else {"version": args.version})
    client = BatchClient(base_url, token)
    started = time.monotonic()
    try:
        response = await client.http.post("/api/batches", json=body)
        if response.status_code != 201:
            raise refusal(response, args.file, lines)
        batch = response.json()
        print(f"batch {batch['id']}: {batch['total']} item(s), {batch['concurrency']} at a time", flush=True)
        progress = Progress("items", args.quiet, total=lambda: batch["total"])
        try:
            final = await client.follow(batch, progress)
        finally:
            progress.close()
    except httpx.HTTPError as error:
        raise ConfigError(f"cannot reach Relay at {base_url} ({type(error).__name__})") from None
    finally:
        await client.http.aclose()
    print(summary_line(final, time.monotonic() - started))
    return 0 if final["counts"] == {"succeeded": final["total"]} else 1


async def status(batch_id: str, base_url: str, token: str) -> int:
    client = BatchClient(base_url, token)
    try:
        batch = await client.get(batch_id)
    except httpx.HTTPError as error:
        raise ConfigError(f"cannot reach Relay at {base_url} ({type(error).__name__})") from None
    finally:
        await client.http.aclose()
    parts = ", ".join(f"{n} {s}" for s, n in sorted(batch["counts"].items()))
    print(f"batch {batch['id']} {batch['status']}: {batch['total']} item(s), {parts}")
    if batch.get("held"):
        print(f"no new item starts: {batch['held']['reason']}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    settings = tool_settings()
    if settings.admin_token is None:
        raise ConfigError("no admin token: set RELAY_ADMIN_TOKEN (or run relay serve once in dev mode)")
    base_url = args.url or settings.base_url
    ws_base(base_url)  # a one-line error for a URL that is not http(s)://
    if args.action == "submit":
        if not 1 <= args.concurrency <= 50:
            raise ConfigError("--concurrency must be between 1 and 50")
        return asyncio.run(submit(args, base_url, settings.admin_token))
    if not BATCH_ID.match(args.batch):  # it goes into a URL path: `../predictions` would be another route
        raise ConfigError(f"{args.batch[:80]!r} is not a batch id (b_ and 32 hex digits)")
    return asyncio.run(status(args.batch, base_url, settings.admin_token))


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    send = actions.add_parser("submit", help="submit a JSON Lines file of inputs and follow it")
    send.add_argument("file", help="one input object a line (JSON Lines)")
    target = send.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="owner/name")
    target.add_argument("--version", help="owner/name:version, or a version id")
    send.add_argument("--concurrency", type=int, default=5, help="predictions at once, 1-50 (default 5)")
    send.add_argument("--quiet", action="store_true", help="no progress bar")
    send.add_argument("--url", help="Relay's base URL (default: RELAY_PUBLIC_URL or http://HOST:PORT)")
    show = actions.add_parser("status", help="a batch's status and counts")
    show.add_argument("batch", help="the batch id (b_…)")
    show.add_argument("--url", help="Relay's base URL (default: RELAY_PUBLIC_URL or http://HOST:PORT)")


COMMANDS = [("batch", "submit a batch of predictions, or show one", cmd_batch, add_batch_arguments)]
