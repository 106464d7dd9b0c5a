"""`relay archive status [--prediction ID] [--failed] [--json]` and `relay archive retry ID`."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from service.archive import console
from service.core.errors import ConfigError
from service.core.settings import tool_settings
from service.db import database
from service.db.connection import Connection
from service.db.vault import Vault
from service.privacy.erasure import ready_connection

T = TypeVar("T")


def with_connection(work: Callable[[Connection, Vault], Awaitable[T]]) -> T:
    settings = tool_settings()
    vault = Vault(settings.key_encryption_keys)

    async def run(dsn: str) -> T:
        conn = await ready_connection(dsn, vault)
        try:
            return await work(conn, vault)
        finally:
            await conn.close()

    with database.database_dsn(settings) as dsn:
        return asyncio.run(run(dsn))


def cmd_status(args: argparse.Namespace) -> int:
    async def work(conn: Connection, vault: Vault) -> tuple[console.Summary, list[dict[str, Any]]]:
        listed = []
        if args.prediction is not None or args.failed:
            listed = await console.list_jobs(conn, vault, prediction_id=args.prediction, failed=args.failed)
        return await console.summary(conn), listed

    summary, listed = with_connection(work)
    if args.json:
        report = {"counts": summary.counts, "stored_bytes": summary.stored_bytes}
        report.update(oldest_pending_seconds=summary.oldest_pending, jobs=listed)
        print(json.dumps(report, indent=2))
        return 0
    for line in summary.lines():
        print(line)
    for job in listed:
        print(console.job_line(job))
    if (args.prediction is not None or args.failed) and not listed:
        print("no matching archive jobs")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    async def work(conn: Connection, vault: Vault) -> int:
        return await console.retry(conn, args.id)

    count = with_connection(work)
    if not count:
        raise ConfigError(
            f"no failed archive job for {args.id[:60]!r} (a prediction id, or a job id from status)"
        )
    print(f"re-queued {count} failed archive job(s); a running relay serve fetches them now")
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    run: Callable[[argparse.Namespace], int] = args.archive_func
    return run(args)


def add_archive_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="archive_command", required=True)
    status = sub.add_parser("status", help="jobs pending, stored and failed; one prediction's files")
    status.add_argument("--prediction", help="list this prediction's output files")
    status.add_argument("--failed", action="store_true", help="list failed jobs with their reasons")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(archive_func=cmd_status)
    again = sub.add_parser("retry", help="re-queue failed jobs: of a prediction, or one job by id")
    again.add_argument("id", help="a prediction id, or a job id from relay archive status")
    again.set_defaults(archive_func=cmd_retry)
