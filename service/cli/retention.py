"""`relay retention --keep 90d [--archive-to DIR|s3://bucket/prefix] [--dry-run]`: retire old
months of the log."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from service.archive.stores import ArchiveStore, open_store
from service.core.errors import ConfigError
from service.core.settings import tool_settings
from service.db import database
from service.db.vault import Vault
from service.ops.retention import Keeper, Retired, keep_in_place, parse_duration, retire
from service.privacy.erasure import ready_connection


def describe(done: Retired, dry_run: bool) -> str:
    verb = "would retire" if dry_run else "retired"
    where = f", exported to {done.kept_at}" if done.kept_at is not None and not dry_run else ""
    return f"{verb} {done.partition.name} ({done.events} event(s){where})"


@contextlib.contextmanager
def archive_target(text: str | None) -> Iterator[tuple[Path | None, Keeper]]:
    """Where each month is exported first, and what then keeps it: a directory keeps it in
    place; for s3:// it is staged in a temporary directory and uploaded."""
    if text is None:
        yield None, keep_in_place
    elif text.startswith("s3://"):
        store = open_store(text, "--archive-to")
        assert store is not None  # only "off" gives None
        with tempfile.TemporaryDirectory(prefix="relay-retention-") as staging:
            yield Path(staging), uploader(store, text)
    elif Path(text).is_dir():
        yield Path(text), keep_in_place
    else:
        raise ConfigError(f"--archive-to {text!r} is not a directory or s3://bucket/prefix; create it first")


def uploader(store: ArchiveStore, url: str) -> Keeper:
    async def upload(file: Path) -> str:
        """The month's file into the bucket, confirmed there, before its partition is dropped."""
        try:
            await store.put(file.name, file)
            uploaded = await store.exists(file.name)
        except Exception as error:  # noqa: BLE001 - obstore raises its own classes for S3 errors
            raise ConfigError(
                f"--archive-to {url}: uploading {file.name} failed ({type(error).__name__}); "
                "that month was not dropped (check the bucket and the AWS_* variables)"
            ) from None
        if not uploaded:
            raise ConfigError(f"--archive-to {url}: {file.name} is not in the bucket after its upload")
        await asyncio.to_thread(file.unlink, missing_ok=True)  # months add up in the staging dir
        return f"{url.rstrip('/')}/{file.name}"

    return upload


def cmd_retention(args: argparse.Namespace) -> int:
    keep = parse_duration(args.keep)
    settings = tool_settings()
    vault = Vault(settings.key_encryption_keys)

    async def run(dsn: str, archive_to: Path | None, keeper: Keeper) -> list[Retired]:
        await database.require_writable(dsn)
        conn = await ready_connection(dsn, vault)
        try:
            return await retire(
                conn,
                keep=keep,
                now=datetime.now(UTC),
                vault=vault,
                archive_to=archive_to,
                keeper=keeper,
                dry_run=args.dry_run,
                report=lambda done: print(describe(done, args.dry_run), flush=True),
            )
        finally:
            await conn.close()

    with archive_target(args.archive_to) as (archive_to, keeper), database.database_dsn(settings) as dsn:
        retired = asyncio.run(run(dsn, archive_to, keeper))
    if not retired:
        print(f"nothing to retire: every partition holds events newer than {args.keep} ago")
    return 0


def add_retention_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", required=True, help="how much of the log to keep, e.g. 90d, 12w")
    parser.add_argument(
        "--archive-to",
        help="where to export retired months first (JSON Lines): a directory or s3://bucket/prefix",
    )
    parser.add_argument("--dry-run", action="store_true", help="list what would be retired; change nothing")


COMMANDS = [
    (
        "retention",
        "export, then drop months of the log older than --keep",
        cmd_retention,
        add_retention_arguments,
    )
]
