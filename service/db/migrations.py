"""Apply the numbered files in `sql/` in order, once each, recorded in `schema_migrations`.

The repository's top-level `sql/` is mapped into the package as `service.sql` (pyproject's
`package-dir`), so a wheel carries the migrations and they are read as package resources.
"""

from __future__ import annotations

import logging
import re
from importlib.resources import files
from importlib.resources.abc import Traversable

from service.db.connection import Connection

SQL_PACKAGE = "service.sql"
MIGRATION_LOCK = 0x52454C4159  # "RELAY": one migrator at a time, across processes

log = logging.getLogger("relay.migrations")
MIGRATION_NAME = re.compile(r"[0-9]{3}_[a-z0-9_]+\.sql")


class Migration:
    """One numbered SQL file, as a package resource (a wheel's or the source tree's)."""

    def __init__(self, resource: Traversable) -> None:
        self.resource = resource
        self.stem = resource.name.removesuffix(".sql")

    def read_text(self) -> str:
        return self.resource.read_text(encoding="utf-8")


class MigrationsMissing(RuntimeError):
    """The installed package carries no migrations: a broken build, never a fresh database."""


def migration_files() -> list[Migration]:
    found = sorted(
        (Migration(entry) for entry in files(SQL_PACKAGE).iterdir() if MIGRATION_NAME.fullmatch(entry.name)),
        key=lambda m: m.stem,
    )
    if not found:
        raise MigrationsMissing(
            f"no migrations found in {SQL_PACKAGE}; reinstall Relay from a complete wheel or checkout"
        )
    return found


async def applied_versions(conn: Connection) -> set[str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}


async def pending(conn: Connection) -> list[Migration]:
    done = await applied_versions(conn)
    return [path for path in migration_files() if path.stem not in done]


async def migrate(conn: Connection) -> list[str]:
    """Apply what is missing; safe to run from several processes at once.

    Each migration runs in its own transaction under a transaction-level advisory lock, and is
    re-checked under that lock: a session lock would outlive its transaction on a connection
    that a pooler (PgBouncer, transaction mode) hands to someone else. With nothing pending it
    changes nothing, so the service's own role (`relay_app`, which may not create tables)
    starts against a schema its owner has migrated.
    """
    applied: list[str] = []
    for migration in await pending(conn):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            if migration.stem in await applied_versions(conn):
                continue  # another process applied it while this one waited for the lock
            await conn.execute(migration.read_text())
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", migration.stem)
        log.debug("applied migration %s", migration.stem)
        applied.append(migration.stem)
    return applied
