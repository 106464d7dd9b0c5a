"""Apply the numbered files in `sql/` in order, once each, recorded in `schema_migrations`."""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
MIGRATION_LOCK = 0x52454C4159  # "RELAY": one migrator at a time, across processes

log = logging.getLogger("relay.migrations")


def migration_files() -> list[Path]:
    return sorted(SQL_DIR.glob("[0-9][0-9][0-9]_*.sql"))


async def applied_versions(conn: asyncpg.Connection) -> set[str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}


async def pending(conn: asyncpg.Connection) -> list[Path]:
    done = await applied_versions(conn)
    return [path for path in migration_files() if path.stem not in done]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply what is missing; safe to run from several processes at once.

    With nothing pending it changes nothing, so the service's own role (`relay_app`, which may
    not create tables) starts against a schema its owner has migrated.
    """
    if not await pending(conn):
        return []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = []
        for path in await pending(conn):
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", path.stem)
            log.debug("applied migration %s", path.stem)
            applied.append(path.stem)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
