"""`relay retention --keep 90d [--archive-to DIR] [--dry-run]`: retire old months of the log."""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime
from pathlib import Path

from service.core.errors import ConfigError
from service.core.settings import tool_settings
from service.db import database
from service.db.vault import Vault
from service.ops.retention import Retired, parse_duration, retire
from service.privacy.erasure import ready_connection


def describe(done: Retired, dry_run: bool) -> str:
    verb = "would retire" if dry_run else "retired"
    where = f", exported to {done.file}" if done.file is not None and not dry_run else ""
    return f"{verb} {done.partition.name} ({done.events} event(s){where})"


def archive_dir(text: str | None) -> Path | None:
    if text is None:
        return None
    path = Path(text)
    if not path.is_dir():
        raise ConfigError(f"--archive-to {text!r} is not a directory; create it first")
    return path


def cmd_retention(args: argparse.Namespace) -> int:
    keep = parse_duration(args.keep)
    archive_to = archive_dir(args.archive_to)
    settings = tool_settings()
    vault = Vault(settings.key_encryption_keys)

    async def run(dsn: str) -> list[Retired]:
        await database.require_writable(dsn)
        conn = await ready_connection(dsn, vault)
        try:
            return await retire(
                conn,
                keep=keep,
                now=datetime.now(UTC),
                vault=vault,
                archive_to=archive_to,
                dry_run=args.dry_run,
                report=lambda done: print(describe(done, args.dry_run), flush=True),
            )
        finally:
            await conn.close()

    with database.database_dsn(settings) as dsn:
        retired = asyncio.run(run(dsn))
    if not retired:
        print(f"nothing to retire: every partition holds events newer than {args.keep} ago")
    return 0


def add_retention_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", required=True, help="how much of the log to keep, e.g. 90d, 12w")
    parser.add_argument("--archive-to", help="directory to export retired months to first (JSON Lines)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be retired; change nothing")


COMMANDS = [
    (
        "retention",
        "export, then drop months of the log older than --keep",
        cmd_retention,
        add_retention_arguments,
    )
]
