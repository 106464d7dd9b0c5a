"""The partitioned log: converting a populated log in place, and retiring whole months."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from service.archive.stores import open_store
from service.db import migrations, store
from service.db.store import Delivery

from .s3 import S3
from .support import Postgres, new_prediction_id, new_webhook_id, query, relay_cli, relay_env

CONVERSION = "100_partitioned_log"
NOW = datetime.now(UTC)


def month_start(back: int) -> datetime:
    """The first instant (UTC) of the month `back` months before this one."""
    year, month = divmod(NOW.year * 12 + NOW.month - 1 - back, 12)
    return datetime(year, month + 1, 1, tzinfo=UTC)


# Three months of the log: two old ones, and this one.
MONTHS_AGO = [
    month_start(3) + timedelta(days=9),
    month_start(2) + timedelta(days=9),
    NOW - timedelta(minutes=1),
]
# A window that ends one day into last month: the two old months are wholly before it.
KEEP = f"{(NOW - month_start(1) - timedelta(days=1)).days}d"


async def migrate_before(dsn: str, version: str) -> None:
    """Apply the migrations older than `version`: a log as it was before that one."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations"
            " (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in migrations.migration_files():
            if migration.stem >= version:
                break
            await conn.execute(migration.read_text())
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", migration.stem)
    finally:
        await conn.close()


def deliveries_at(moment: datetime, count: int) -> list[Delivery]:
    prediction_id = new_prediction_id()
    body = json.dumps({"id": prediction_id, "status": "processing"}).encode()
    return [
        Delivery(
            new_webhook_id(), prediction_id, "processing", "webhook", body, moment + timedelta(seconds=i)
        )
        for i in range(count)
    ]


async def append_all(dsn: str, batches: list[list[Delivery]]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for batch in batches:
            await store.append(conn, batch)
    finally:
        await conn.close()


@pytest.fixture
def converted(postgres: Postgres) -> tuple[str, list[tuple]]:
    """A log with rows in three months, written before the conversion, then converted."""
    dsn = postgres.new_database(migrate=False)
    asyncio.run(migrate_before(dsn, CONVERSION))
    asyncio.run(append_all(dsn, [deliveries_at(moment, 4) for moment in MONTHS_AGO]))
    before = [tuple(row) for row in query(dsn, "SELECT * FROM events ORDER BY seq")]
    done = relay_cli("migrate", env=relay_env(dsn))
    assert done.returncode == 0 and CONVERSION in done.stdout, done.stderr
    return dsn, before


def test_conversion_keeps_every_row_seq_and_webhook_id(converted):
    """Every row, byte for byte and with its seq, is in its month's partition after the migration."""
    dsn, before = converted
    after = [tuple(row) for row in query(dsn, "SELECT * FROM events ORDER BY seq")]
    assert after == before
    placed = query(dsn, "SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1 ORDER BY 1")
    assert [count for _, count in placed] == [4, 4, 4]
    assert all(name.startswith("events_2") for name, _ in placed)  # none in events_default
    # A delivery already in the log stays a duplicate, with the seq it had.
    first = before[0]
    again = Delivery(first[1], first[2], first[3], first[4], first[5], NOW)
    asyncio.run(append_all(dsn, [[again]]))
    assert query(dsn, "SELECT count(*) FROM events")[0][0] == 12
    # New deliveries continue the seq past the converted rows.
    asyncio.run(append_all(dsn, [deliveries_at(NOW, 1)]))
    assert query(dsn, "SELECT max(seq) FROM events")[0][0] > before[-1][0]


def test_the_partitioned_log_is_still_append_only(converted):
    dsn, _ = converted
    for statement in ("UPDATE events SET status = 'x'", "DELETE FROM events", "TRUNCATE events"):
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            query(dsn, statement)


def test_retention_exports_then_drops_the_months_before_the_window(converted, tmp_path: Path):
    """`--keep` retires the two old months: exported exactly, then gone; the rest untouched."""
    dsn, before = converted
    env = relay_env(dsn)
    expected = relay_cli("export", "-o", str(tmp_path / "all.jsonl"), env=env)
    assert expected.returncode == 0
    exported_lines = (tmp_path / "all.jsonl").read_text().splitlines()
    archive = tmp_path / "archive"
    archive.mkdir()

    dry = relay_cli("retention", "--keep", KEEP, "--dry-run", env=env)
    assert dry.returncode == 0 and dry.stdout.count("would retire") == 2
    assert query(dsn, "SELECT count(*) FROM events")[0][0] == 12

    done = relay_cli("retention", "--keep", KEEP, "--archive-to", str(archive), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("retired") == 2
    files = sorted(archive.glob("*.jsonl"))
    assert [f.name for f in files] == sorted(f"{name}.jsonl" for name in retired_names(before))
    assert [line for f in files for line in f.read_text().splitlines()] == exported_lines[:8]
    assert [row[0] for row in query(dsn, "SELECT seq FROM events ORDER BY seq")] == [r[0] for r in before[8:]]
    # Nothing is due any more; a second run changes nothing.
    again = relay_cli("retention", "--keep", KEEP, env=env)
    assert again.returncode == 0 and "nothing to retire" in again.stdout


async def objects(url: str) -> dict[str, bytes]:
    bucket = open_store(url)
    assert bucket is not None
    return {key: b"".join([chunk async for chunk in bucket.chunks(key)]) for key in await bucket.keys()}


def test_retention_archives_to_s3_and_a_failed_upload_drops_nothing(converted, tmp_path: Path):
    """`--archive-to s3://…` (a real S3-protocol server): each month is uploaded, confirmed, then
    dropped; a bucket that does not exist stops the run with one line and drops nothing."""
    dsn, before = converted
    env = relay_env(dsn)
    assert relay_cli("export", "-o", str(tmp_path / "all.jsonl"), env=env).returncode == 0
    exported_lines = (tmp_path / "all.jsonl").read_text().splitlines()
    with S3() as s3:
        env = {**env, **s3.env}
        missing = relay_cli(
            "retention", "--keep", KEEP, "--archive-to", "s3://relay-no-such-bucket/log", env=env
        )
        assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
        assert "was not dropped" in missing.stderr and "Traceback" not in missing.stderr
        assert query(dsn, "SELECT count(*) FROM events")[0][0] == 12

        url = s3.new_bucket()
        done = relay_cli("retention", "--keep", KEEP, "--archive-to", url, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count(f"exported to {url}/events_") == 2
        kept = asyncio.run(objects(url))
    assert sorted(kept) == sorted(f"{name}.jsonl" for name in retired_names(before))
    assert [line for key in sorted(kept) for line in kept[key].decode().splitlines()] == exported_lines[:8]
    assert query(dsn, "SELECT count(*) FROM events")[0][0] == 4


def retired_names(rows: list[tuple]) -> set[str]:
    return {f"events_{row[8]:%Y_%m}" for row in rows[:8]}


@pytest.mark.parametrize("keep", ["90", "0d", "-3d", "ninety days"])
def test_a_bad_keep_is_one_line(converted, keep: str):
    dsn, _ = converted
    done = relay_cli("retention", "--keep", keep, env=relay_env(dsn))
    assert done.returncode == 2 and "--keep" in done.stderr and "Traceback" not in done.stderr
    assert query(dsn, "SELECT count(*) FROM events")[0][0] == 12
