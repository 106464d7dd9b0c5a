"""`sql/040_roles.sql`: a real `relay serve` logged in as a member of `relay_app` does everything
the service does, and that role cannot UPDATE, DELETE or TRUNCATE the log."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
from collections.abc import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from service.ops.simulate import MODEL

from .fake_replicate import CREATE, api_client, relay_for, watch
from .support import (
    ADMIN_TOKEN,
    Postgres,
    admin_headers,
    deliver_lifecycle,
    new_prediction_id,
    new_webhook_id,
    query,
    relay_cli,
    relay_env,
    wait_for,
)

APP_ROLE = "relay_app"


def with_user(dsn: str, user: str, password: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


@pytest.fixture(scope="module")
def owner(postgres: Postgres) -> str:
    """A database migrated by its owner (which creates relay_app, if no database did before)."""
    return postgres.new_database()


@pytest.fixture(scope="module")
def login(postgres: Postgres, owner: str) -> Iterator[tuple[str, str]]:
    """A login role that is a member of relay_app, as an operator makes one: (user, password).
    Roles are cluster-wide, so the name is unique to this run."""
    user, password = f"relay_login_{os.getpid()}_{secrets.token_hex(3)}", secrets.token_urlsafe(16)
    query(postgres.admin_dsn, f"CREATE ROLE {user} LOGIN PASSWORD '{password}' IN ROLE {APP_ROLE}")
    yield user, password
    query(postgres.admin_dsn, f"DROP ROLE {user}")


@pytest.fixture(scope="module")
def app(owner: str, login: tuple[str, str]) -> str:
    """The owner's database, as the login role."""
    return with_user(owner, *login)


async def as_role(dsn: str, sql: str, *args: object) -> str:
    """Run one statement; the error message Postgres answers, or 'ok'."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql, *args)
        return "ok"
    except asyncpg.PostgresError as error:
        return f"{type(error).__name__}: {error}"
    finally:
        await conn.close()


def test_relay_serves_everything_as_a_member_of_relay_app(owner, app, fake):
    """Start-up (nothing pending), webhooks, reads, streams, the /api proxy with its quota, the
    budget alerts, forgetting and key rotation all work with relay_app's grants alone."""
    assert query(app, "SELECT current_user, pg_has_role(current_user, $1, 'member')", APP_ROLE)[0][1]
    key, new_key = (base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    extra = {
        "RELAY_ENCRYPTION_KEY": key,
        "RELAY_PRICES": f"{MODEL}=0.001",
        "RELAY_BUDGET": "0.000001",
        "RELAY_BUDGET_INTERVAL": "1",
    }
    prediction_id = new_prediction_id()
    with (
        relay_for(app, fake, **extra) as relay,
        httpx.Client(base_url=relay.url, timeout=30, headers=admin_headers()) as http,
    ):
        seqs = deliver_lifecycle(http, prediction_id)
        events = http.get(f"/predictions/{prediction_id}/events").json()["events"]
        assert [event["seq"] for event in events] == seqs
        messages, code = watch(relay, f"{relay.ws_url}/predictions/{prediction_id}/ws", ADMIN_TOKEN)
        assert [m["seq"] for m in messages if m["type"] == "event"] == seqs and code == 1000

        with api_client(relay) as api:
            created = api.post("/api/predictions", json=CREATE)
            assert created.status_code == 201, created.text
            # prediction_owners (050): recorded at create, read back for the key's own GET.
            assert api.get(f"/api/predictions/{created.json()['id']}").status_code == 200
            proxied, code = watch(relay, created.json()["relay"]["ws"], created.json()["relay"]["token"])
            assert proxied[-1]["status"] == "succeeded" and code == 1000

        wait_for(lambda: query(owner, "SELECT count(*) FROM budget_alerts")[0][0] == 2)
        forgotten = http.delete(f"/admin/predictions/{prediction_id}")
        assert forgotten.status_code == 200 and forgotten.json()["erased"] is True
        assert http.get(f"/predictions/{prediction_id}").json()["status"] == "succeeded"
    assert "permission denied" not in relay.output and "Traceback" not in relay.output

    rotated = relay_cli("rotate-keys", env=relay_env(app, RELAY_ENCRYPTION_KEY=f"{new_key} {key}"))
    assert rotated.returncode == 0 and "done: 1 data key(s) re-wrapped" in rotated.stdout, rotated
    assert query(owner, "SELECT count(*) FROM data_keys WHERE prediction_id = $1", prediction_id)[0][0] == 0
    assert (
        query(owner, "SELECT count(*) FROM events WHERE prediction_id = $1", prediction_id)[0][0]
        == len(seqs) + 1
    )


def test_relay_app_cannot_update_delete_or_truncate_the_log(owner, app):
    """The grant refuses these before the append-only trigger is reached; nor can the role drop
    or disable that trigger."""
    webhook_id = new_webhook_id()
    insert = (
        "INSERT INTO events (webhook_id, prediction_id, status, source, body, received_at)"
        " VALUES ($1, 'p1', 'starting', 'webhook', '{}', now())"
    )
    assert asyncio.run(as_role(app, insert, webhook_id)) == "ok"
    denied = "InsufficientPrivilegeError: permission denied for table events"
    not_owner = "InsufficientPrivilegeError: must be owner of"
    attempts = {
        "UPDATE events SET status = 'succeeded'": denied,
        "DELETE FROM events": denied,
        "TRUNCATE events": denied,
        "ALTER TABLE events DISABLE TRIGGER events_no_update_delete": not_owner,
        "DROP TRIGGER events_no_update_delete ON events": not_owner,
    }
    answers = {sql: asyncio.run(as_role(app, sql)) for sql in attempts}
    assert all(answers[sql].startswith(expected) for sql, expected in attempts.items()), answers
    assert query(owner, "SELECT status FROM events WHERE webhook_id = $1", webhook_id)[0][0] == "starting"
    # The owner is stopped only by the trigger: the grant is a second, independent wall.
    assert "append-only" in asyncio.run(as_role(owner, "DELETE FROM events"))


def test_relay_app_has_grants_on_every_table_and_only_appends_to_the_log(owner):
    """A migration that adds a table without granting relay_app what it needs fails here."""
    rows = query(
        owner,
        "SELECT c.relname, array(SELECT p FROM unnest($2::text[]) AS p"
        " WHERE has_table_privilege($1, c.oid, p) ORDER BY p) FROM pg_class c"
        " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p') ORDER BY 1",
        APP_ROLE,
        ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"],
    )
    grants = {table: set(privileges) for table, privileges in rows}
    # The log's monthly partitions are reached through `events` only: nothing is granted on them.
    partitions = {table for table in grants if table.startswith("events_")}
    assert "events_default" in partitions and all(not grants.pop(table) for table in partitions)
    assert grants.pop("events") == {"SELECT", "INSERT"}
    assert grants.pop("webhook_ids") == {"SELECT", "INSERT"}
    assert grants.pop("schema_migrations") == {"SELECT"}
    assert all("SELECT" in privileges and "TRUNCATE" not in privileges for privileges in grants.values()), (
        grants
    )


def test_start_up_as_relay_app_with_pending_migrations_is_one_clear_line(postgres, login):
    empty = with_user(postgres.new_database(migrate=False), *login)
    result = relay_cli("serve", "--port", "0", env=relay_env(empty), timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        (
            "relay: error: migrations are pending and the role in DATABASE_URL may not apply them "
            "(permission denied for schema public); run `relay migrate` as the role that owns "
            "Relay's tables (docs/reliability.md: database roles)"
        )
    ]
    assert result.stdout == ""
