"""`relay forget` and `relay rotate-keys`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from service.archive import console as archive_console
from service.archive.stores import open_store
from service.batches import store as batch_store
from service.core.errors import ConfigError
from service.core.settings import tool_settings
from service.db import database
from service.db.vault import Vault
from service.privacy.erasure import ENCRYPTION_OFF, forget_all, ready_connection, rotate


def cmd_forget(args: argparse.Namespace) -> int:
    settings = tool_settings()
    vault = Vault(settings.key_encryption_keys)
    if not vault.enabled:
        raise ConfigError(ENCRYPTION_OFF)
    with database.database_dsn(settings) as dsn:
        asyncio.run(database.require_writable(dsn))
        status = asyncio.run(forget_all(dsn, vault, args.predictions))
        if not asyncio.run(forget_files(dsn, vault, settings.archive, args.predictions)):
            status = 2
    return status


async def forget_files(dsn: str, vault: Vault, archive: str, prediction_ids: list[str]) -> bool:
    """Delete forgotten predictions' archived files now (a running server would also do it,
    when its archive worker reads the erasure events from the log). False, said in one line,
    when the store cannot delete them now: the jobs stay for the erasure events to finish."""
    files = open_store(archive)
    conn = await ready_connection(dsn, vault)
    try:
        deleted = await archive_console.forget(conn, files, prediction_ids)
    except Exception as error:  # noqa: BLE001 - the store's own classes (S3 unreachable, refusing)
        # The class only: the store's error text carries its endpoint, bucket and object keys.
        print(f"relay: the archived files could not be deleted now ({type(error).__name__}); "
              "relay serve deletes them when it reads the erasure events", file=sys.stderr)  # fmt: skip
        return False
    finally:
        await conn.close()
    if deleted:
        print(f"deleted {deleted} archived file(s)")
    return True


def cmd_rotate_keys(args: argparse.Namespace) -> int:
    settings = tool_settings()
    vault = Vault(settings.key_encryption_keys)
    with database.database_dsn(settings) as dsn:
        asyncio.run(database.require_writable(dsn))
        count = asyncio.run(rotate(dsn, vault))
        inputs = asyncio.run(reseal_batch_inputs(dsn, vault))
    print(f"done: {count} data key(s) re-wrapped; every data key is now wrapped by key {vault.current_id}")
    if inputs:
        print(f"{inputs} waiting batch input(s) sealed again under key {vault.current_id}")
    return 0


async def reseal_batch_inputs(dsn: str, vault: Vault) -> int:
    conn = await ready_connection(dsn, vault)
    try:
        return await batch_store.reseal_inputs(conn, vault)
    except batch_store.InputUnreadable as error:
        raise ConfigError(f"a waiting batch input cannot be opened ({error}); keep its key listed") from None
    finally:
        await conn.close()


def add_forget_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", nargs="+", metavar="PREDICTION", help="prediction ids to forget")
