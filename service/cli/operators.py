"""Operator commands: `relay events`, `relay export`, `relay replay`, `relay tail`.

They read the database directly (DATABASE_URL, or the embedded server in the data dir), except
`tail`, which watches the live WebSocket API. Long runs draw a progress line on a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import TextIO, TypeVar

import asyncpg

from service.cli.progress import Progress
from service.core.errors import ConfigError, RelayError
from service.core.filters import add_filter_arguments, filter_from_args
from service.core.params import MAX_PAGE, parse_int
from service.core.settings import tool_settings
from service.db import database, store
from service.db.events import page_text
from service.db.vault import Vault
from service.ops.export import Written, export
from service.ops.replay import (
    DEFAULT_CONCURRENCY,
    DEFAULT_RETRIES,
    FanoutTarget,
    Report,
    Target,
    replay,
    url_target,
)
from service.ops.tail import tail, ws_base
from service.privacy.erasure import ready_connection

T = TypeVar("T")


# What asyncpg raises when the server goes away under a running command (a restart, a failover,
# pg_terminate_backend): the command says so in one line instead of a traceback.
# Not any OSError: writing the output fails with those too (a full disk, a closed pipe).
CONNECTION_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    ConnectionResetError,
)


class DatabaseLost(ConfigError):
    """The database went away while a command ran; `what` says so without the advice."""

    def __init__(self, what: str):
        super().__init__(f"{what}; run the command again once it is back")
        self.what = what


def with_connection(work: Callable[[asyncpg.Connection], Awaitable[T]], *, writes: bool = False) -> T:
    """Run `work` on a connection to the configured database, once the configured key is known
    to open its payloads: a wrong or missing key is a one-line error, never unreadable output.

    Reads go to RELAY_READ_DATABASE_URL when it is set (a replica: seq order is commit order, so
    a lagging copy holds a prefix of the log and paging by seq skips nothing); work that
    `writes` goes to DATABASE_URL, which must then be writable (one line if it is a standby)."""
    settings = tool_settings()

    async def run(dsn: str) -> T:
        name = "DATABASE_URL"
        if writes:
            await database.require_writable(dsn)
        elif settings.read_database_url is not None:
            dsn, name = str(settings.read_database_url), "RELAY_READ_DATABASE_URL"
        conn = await ready_connection(dsn, cli_vault(), name=name)
        try:
            return await work(conn)
        except CONNECTION_LOST as error:
            raise DatabaseLost(
                f"lost the connection to the database in {name} ({type(error).__name__}): "
                "it stopped, restarted or failed over"
            ) from None
        finally:
            await conn.close()

    with database.database_dsn(settings) as dsn:
        return asyncio.run(run(dsn))


@functools.cache
def cli_vault() -> Vault:
    """What CLI readers decrypt with: the configured RELAY_ENCRYPTION_KEY(s). One per command, so
    the vault checked on connecting is the one that reads, with one data-key cache."""
    return Vault(tool_settings().key_encryption_keys)


def bounded(flag: str, value: int, minimum: int, maximum: int) -> int:
    try:
        return parse_int(flag, str(value), minimum, minimum, maximum)
    except RelayError as error:
        raise ConfigError(error.message) from None


def cmd_events(args: argparse.Namespace) -> int:
    event_filter = filter_from_args(args)
    limit = bounded("--limit", args.limit, 1, MAX_PAGE)
    where, params = event_filter.where()
    rows = with_connection(lambda conn: store.fetch_where(conn, where, params, limit))
    if args.json:
        print(page_text(rows, cli_vault(), event_filter.after))  # exact bodies, as /admin/events
        return 0
    print_table(rows, sys.stdout)
    if len(rows) == limit:
        print(f"more events: add --after {rows[-1]['seq']}", file=sys.stderr)
    return 0


TABLE_COLUMNS = ("seq", "received_at", "prediction_id", "status", "source", "webhook_id")


def print_table(rows: list[asyncpg.Record], out: TextIO) -> None:
    cells = [[c.upper() for c in TABLE_COLUMNS]]
    for row in rows:
        cells.append([str(store.iso(row[c]) if c == "received_at" else row[c]) for c in TABLE_COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_COLUMNS))]
    for line in cells:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        out.write("\n")


@contextlib.contextmanager
def output_file(path: str | None) -> Iterator[TextIO]:
    if path is None or path == "-":
        sys.stdout.reconfigure(encoding="utf-8", newline="\n")  # type: ignore[union-attr]
        yield sys.stdout
        return
    try:
        handle = open(path, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
    except OSError as error:
        raise ConfigError(f"-o: cannot write {path!r} ({error.strerror})") from None
    with handle:
        yield handle


def cmd_export(args: argparse.Namespace) -> int:
    event_filter = filter_from_args(args)
    progress = Progress("exported", args.quiet)
    written = Written()

    async def run(conn: asyncpg.Connection) -> int:
        with output_file(args.output) as out:  # opened once the key is checked: no file of garbage
            return await export(conn, event_filter, out, cli_vault(), progress, written)

    try:
        count = with_connection(run)
    except DatabaseLost as error:
        progress.close()
        if written.last_seq is None:
            raise
        raise ConfigError(f"{error.what}; once it is back, {resume_export(written, args.output)}") from None
    except KeyboardInterrupt:
        progress.close()
        print(interrupted_export(written, args.output), file=sys.stderr)
        return 130
    progress.close()
    if not args.quiet:
        print(f"exported {count} event(s) to {args.output or 'stdout'}", file=sys.stderr)
    return 0


def interrupted_export(written: Written, output: str | None) -> str:
    """What Ctrl-C leaves: whole lines up to a seq, and the command that writes the rest."""
    if written.last_seq is None:
        return "relay export: interrupted before any event was written"
    return f"relay export: interrupted; for the rest, {resume_export(written, output)}"


def resume_export(written: Written, output: str | None) -> str:
    rest = "to another file" if output not in (None, "-") else "appended with >>"
    return (
        f"run the same command with --after {written.last_seq} ({rest}): "
        f"{written.count} event(s) were written, up to seq {written.last_seq}"
    )


def replay_target(args: argparse.Namespace) -> Target:
    if args.fanout:
        if args.secret is not None:
            raise ConfigError("--secret is for --to URL; --fanout needs none")
        return FanoutTarget()
    if args.secret is None:
        raise ConfigError("--to needs --secret whsec_… (the receiver's Standard Webhooks secret)")
    try:
        return url_target(args.to, args.secret)
    except RelayError as error:
        raise ConfigError(error.message) from None


def cmd_replay(args: argparse.Namespace) -> int:
    event_filter = filter_from_args(args)
    target = replay_target(args)
    concurrency = bounded("--concurrency", args.concurrency, 1, 64)
    retries = bounded("--retries", args.retries, 0, 20)
    report = Report()
    progress = Progress("replayed", args.quiet or args.dry_run, total=lambda: report.matched)

    async def run(conn: asyncpg.Connection) -> Report:
        return await replay(
            conn,
            event_filter,
            target,
            cli_vault(),
            dry_run=args.dry_run,
            concurrency=concurrency,
            retries=retries,
            report=report,
            progress=progress,
        )

    try:
        # To live subscribers, replay NOTIFYs: only the primary can (a standby refuses writes).
        with_connection(run, writes=isinstance(target, FanoutTarget) and not args.dry_run)
    except KeyboardInterrupt:
        progress.close()
        if report.resume_after is None:  # stopped while planning: nothing was sent
            print("relay replay: interrupted before anything was sent", file=sys.stderr)
        else:
            print(
                f"relay replay: interrupted; every event up to seq {report.resume_after} was delivered: "
                f"resume with --after {report.resume_after}",
                file=sys.stderr,
            )
        return 130
    progress.close()
    print(json.dumps(report.as_json()) if args.json else describe(report))
    return 1 if report.failed else 0


def describe(report: Report) -> str:
    if report.matched == 0:
        return "no events match"
    lines = [
        (
            f"matched {report.matched} event(s), seq {report.first_seq}..{report.last_seq}, "
            f"{report.predictions} prediction(s)"
        )
    ]
    if report.dry_run:
        return lines[0] + "\ndry run: nothing sent"
    unsent = report.matched - report.delivered - len(report.failed)
    stopped = f", not sent {unsent} (the run stops at a failure)" if unsent > 0 else ""
    lines.append(f"delivered {report.delivered}, failed {len(report.failed)}{stopped}")
    lines += [f"failed seq {f['seq']}: {f['reason']}" for f in report.failed]
    if report.failed:
        lines.append(f"resume with --after {report.resume_after}")
    return "\n".join(lines)


def cmd_tail(args: argparse.Namespace) -> int:
    settings = tool_settings()
    if settings.admin_token is None:
        raise ConfigError("no admin token: set RELAY_ADMIN_TOKEN (or run relay serve once in dev mode)")
    base = ws_base(args.url or settings.base_url)
    after = bounded("--after", args.after, 0, 2**63 - 1)
    return asyncio.run(tail(base, settings.admin_token, args.prediction, after, print_now))


def print_now(line: str) -> None:
    print(line, flush=True)


def add_events_arguments(parser: argparse.ArgumentParser) -> None:
    add_filter_arguments(parser)
    parser.add_argument("--limit", type=int, default=100, help=f"at most this many (1-{MAX_PAGE})")
    parser.add_argument("--json", action="store_true", help="print the admin API's JSON instead")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    add_filter_arguments(parser)
    parser.add_argument("-o", "--output", help="file to write (default: stdout)")
    parser.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    add_filter_arguments(parser)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="URL", help="re-deliver to this URL, signed")
    where.add_argument("--fanout", action="store_true", help="re-send to live WebSocket subscribers")
    parser.add_argument("--secret", help="whsec_… secret to sign with (with --to)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, send nothing")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="per event, on 429/5xx/network")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def add_tail_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prediction", nargs="?", help="one prediction (default: every event)")
    parser.add_argument("--after", type=int, default=0, help="start after this seq")
    parser.add_argument("--url", help="Relay's base URL (default: RELAY_PUBLIC_URL or http://HOST:PORT)")


# (name, help, run it, add its arguments)
Command = tuple[
    str, str, Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], object] | None
]

COMMANDS: list[Command] = [
    ("events", "list stored events as a table", cmd_events, add_events_arguments),
    ("export", "write stored events as JSON Lines", cmd_export, add_export_arguments),
    ("replay", "re-deliver stored events to a URL or to live subscribers", cmd_replay, add_replay_arguments),
    ("tail", "print live events as they arrive", cmd_tail, add_tail_arguments),
]
