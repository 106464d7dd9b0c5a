"""`relay destinations add URL [filters] [--from …] | list | remove | retry | pause | resume ID | run`.

Like the other operator commands it works on the database directly; the running instances
notice a change at once (NOTIFY) and start, stop or re-send accordingly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from service.cli.operators import cli_vault, with_connection
from service.core.errors import ConfigError, RelayError
from service.core.settings import tool_settings
from service.db import database
from service.db.vault import check_keys
from service.destinations import model
from service.destinations.manager import run_standalone
from service.net.guard import require_public

FILTER_FLAGS = {"prediction_id": "--prediction", "status": "--status", "source": "--source",
                "since": "--since", "until": "--until"}  # fmt: skip


def run(work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    """`work` on a connection; a user's mistake (unknown id, bad value) is one line, exit 2."""
    try:
        return with_connection(work)
    except RelayError as error:
        raise ConfigError(error.message) from None


def cmd_add(args: argparse.Namespace) -> int:
    filters = {name: getattr(args, name) for name in FILTER_FLAGS if getattr(args, name) is not None}
    try:
        new = model.parse_new({"url": args.url, "secret": args.secret, "filter": filters, "from": args.start})
    except RelayError as error:
        message = error.message
        for name, flag in FILTER_FLAGS.items():
            message = message.replace(f"{name} must", f"{flag} must", 1)
        raise ConfigError(message) from None
    if not tool_settings().replay_private:  # the servers would refuse to connect there
        try:
            asyncio.run(require_public(new.url, "the destination"))
        except RelayError as error:
            raise ConfigError(error.message) from None
    created = run(lambda conn: model.create(conn, new, cli_vault()))
    if args.json:
        print(json.dumps(created))
        return 0
    print(f"added {created['id']} -> {created['url']} from seq {created['cursor']}")
    print(f"secret (shown only now): {created['secret']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    found = run(model.listing)
    if args.json:
        print(json.dumps({"destinations": found}))
        return 0
    if not found:
        print("no destinations")
        return 0
    for d in found:
        state = (
            "paused"
            if d["paused"]
            else "FAILING"
            if d["failing"]
            else "retrying"
            if d["pending"]
            else "active"
        )
        print(
            f"{d['id']}  {state}  {d['url']}  cursor {d['cursor']}  lag {d['lag']} ({d['lag_seconds']:.0f}s)"
            f"  pending {d['pending']}  exhausted {d['exhausted']}"
            + (f"  filter {json.dumps(d['filter'])}" if d["filter"] else "")
            + (f"\n    last error: {d['last_error']} at {d['last_error_at']}" if d["last_error"] else "")
        )
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    run(lambda conn: model.remove(conn, args.id))
    print(f"removed {args.id}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    requeued = run(lambda conn: model.retry(conn, args.id))
    print(f"re-queued {requeued} exhausted event(s) of {args.id}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    run(lambda conn: model.set_paused(conn, args.id, True))
    print(f"paused {args.id}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    run(lambda conn: model.set_paused(conn, args.id, False))
    print(f"resumed {args.id}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Send every destination this process can hold, until SIGINT or SIGTERM."""
    settings = tool_settings()

    async def main(dsn: str) -> None:
        await check_keys(dsn, cli_vault())
        task = asyncio.ensure_future(run_standalone(database.databases(settings, dsn), cli_vault(), settings))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with database.database_dsn(settings) as dsn:
        asyncio.run(main(dsn))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="forward every matching event to URL")
    add.add_argument("url")
    add.add_argument("--secret", help="whsec_… to sign with (default: a new one, printed once)")
    add.add_argument("--from", dest="start", metavar="now|start|SEQ", help="where to start (default now)")
    for name, flag in FILTER_FLAGS.items():
        add.add_argument(flag, dest=name, metavar=name.split("_")[0].upper())
    add.add_argument("--json", action="store_true", help="print the answer as JSON")
    add.set_defaults(run_action=cmd_add)
    listing = sub.add_parser("list", help="destinations with cursor, lag, pending, exhausted, last error")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run_action=cmd_list)
    for name, func, text in (
        ("remove", cmd_remove, "remove a destination (its owed events too)"),
        ("retry", cmd_retry, "send a destination's exhausted events again"),
        ("pause", cmd_pause, "stop sending (events keep accumulating)"),
        ("resume", cmd_resume, "send again, from where it paused"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("id")
        command.set_defaults(run_action=func)
    runner = sub.add_parser(
        "run", help="send destinations from this process (servers with RELAY_DESTINATIONS=off)"
    )
    runner.set_defaults(run_action=cmd_run)


def cmd_destinations(args: argparse.Namespace) -> int:
    result: int = args.run_action(args)
    sys.stdout.flush()
    return result


COMMANDS: list[tuple[str, str, Callable[[argparse.Namespace], int], Callable[[Any], None]]] = [
    ("destinations", "forward the log to your backends: add, list, remove, retry, pause, resume",
     cmd_destinations, add_arguments),
]  # fmt: skip
