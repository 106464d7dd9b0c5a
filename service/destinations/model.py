"""Destinations as stored: adding one (validated), listing them with their lag, and the
operator's actions (pause, resume, retry, remove). Shared by the admin API and the CLI.

A destination's secret is generated when none is given and shown only in the answer to `add`;
it is stored sealed under RELAY_ENCRYPTION_KEY when that is set.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from service.core.errors import ConfigError, InvalidRequest, NotFound
from service.core.filters import EventFilter, parse_filter
from service.core.settings import decode_webhook_secret
from service.db import store
from service.db.connection import Connection
from service.db.vault import Vault

MAX_URL = 2048
FIELDS = ("url", "secret", "filter", "from")
# Filters a destination takes: where it starts is `from`, and it has no end.
FILTERS = ("prediction_id", "status", "source", "since", "until")
FAILING_AFTER = timedelta(days=1)  # failing everything this long: flagged in list and dashboard
LAG_COUNT_LIMIT = 1_000_000  # lag is counted up to this many events, so listing stays cheap


@dataclass(frozen=True)
class NewDestination:
    url: str
    secret: str
    filter: dict[str, str]
    start: str | int  # "now", "start", or a seq


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_url(url: Any) -> str:
    # Printable ASCII only, as RFC 3986 has it: the sender writes the URL into the request line
    # as it is, where a space or a non-ASCII character (an IDN host, `café` in a path) made every
    # delivery fail. Percent-encode such characters, or give the host in punycode (xn--…).
    printable = isinstance(url, str) and len(url) <= MAX_URL and all("!" <= c <= "~" for c in url)
    text: str = url if printable else ""
    try:
        parts = urlsplit(text)
        scheme, host, netloc = parts.scheme, parts.hostname, parts.netloc
        parts.port  # noqa: B018 - read for its check: a port that is not a number from 0 to 65535 raises
    except ValueError:  # a malformed [IPv6] or port
        scheme, host, netloc = "", None, ""
    if scheme not in ("http", "https") or not host:
        raise InvalidRequest(
            f"url must be an http:// or https:// URL with a host and a valid port, in printable ASCII"
            f" (percent-encode other characters; at most {MAX_URL} chars)"
        )
    if "@" in netloc:  # the sender sends no Authorization: the receiver would answer 401 forever
        raise InvalidRequest("url must not hold credentials (user:password@): Relay does not send them")
    return text


def check_secret(secret: Any) -> str:
    if secret is None:
        return new_secret()
    if not isinstance(secret, str) or not secret.startswith("whsec_"):
        raise InvalidRequest("secret must be a whsec_… secret (base64 after whsec_), or left out")
    try:
        decode_webhook_secret(secret, "secret")
    except ConfigError as error:
        raise InvalidRequest(str(error)) from None
    return secret


def check_filter(values: Any) -> dict[str, str]:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InvalidRequest("filter must be an object of filters")
    unknown = sorted(set(values) - set(FILTERS))
    if unknown:
        raise InvalidRequest(
            f"unknown filter {unknown[0]!r}; a destination's filters are: {', '.join(FILTERS)} "
            "(where it starts is `from`)"
        )
    return parse_filter(values).as_params()


def check_start(start: Any) -> str | int:
    if start is None:
        return "now"
    if start in ("now", "start"):
        return str(start)
    if isinstance(start, str) and start.isascii() and start.isdigit() and len(start) <= 19:
        start = int(start)
    if isinstance(start, int) and not isinstance(start, bool) and 0 <= start < 2**63:
        return start
    raise InvalidRequest('from must be "now", "start" or a seq (a whole number)')


def parse_new(payload: Any) -> NewDestination:
    """`{"url", "secret"?, "filter"?, "from"?}`; InvalidRequest naming what is wrong."""
    if not isinstance(payload, dict):
        raise InvalidRequest('the body must be a JSON object: {"url": "https://…"}')
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown field {str(unknown[0])[:40]!r}; expected {', '.join(FIELDS)}")
    return NewDestination(
        url=check_url(payload.get("url")),
        secret=check_secret(payload.get("secret")),
        filter=check_filter(payload.get("filter")),
        start=check_start(payload.get("from")),
    )


def event_filter(stored: Any) -> EventFilter:
    """The stored filter (jsonb, as text or a dict) as an EventFilter."""
    values = json.loads(stored) if isinstance(stored, str) else dict(stored or {})
    return parse_filter(values)


async def create(conn: Connection, new: NewDestination, vault: Vault) -> dict[str, Any]:
    """Store a destination; the answer is the only place its secret is shown."""
    end = await store.max_seq(conn)
    if new.start == "now":
        cursor = end
    elif new.start == "start":
        cursor = 0
    else:
        cursor = int(new.start)
        if cursor > end:
            raise InvalidRequest(f"from {cursor} is beyond the end of the log (seq {end})")
    destination_id = "dst_" + secrets.token_hex(8)
    sealed, kek_id = vault.seal_secret(new.secret, destination_id)
    await conn.execute(
        "INSERT INTO destinations (id, url, secret, kek_id, filter, cursor) VALUES ($1, $2, $3, $4, $5, $6)",
        destination_id,
        new.url,
        sealed,
        kek_id,
        json.dumps(new.filter),
        cursor,
    )
    await conn.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, destination_id)
    return {
        "id": destination_id,
        "url": new.url,
        "secret": new.secret,
        "cursor": cursor,
        "filter": new.filter,
    }


CHANGES_CHANNEL = "relay_destinations"  # a destination was added or changed: look again

LIST = """
SELECT d.id, d.url, d.filter::text AS filter, d.cursor, d.paused, d.created_at, d.last_success_at,
       d.last_error, d.last_error_at, d.failing_since,
       count(*) FILTER (WHERE e.state = 'owed') AS pending,
       count(*) FILTER (WHERE e.state = 'exhausted') AS exhausted,
       min(e.seq) FILTER (WHERE e.state = 'owed') AS oldest_owed
FROM destinations d LEFT JOIN destination_events e ON e.destination_id = d.id
WHERE $1::text IS NULL OR d.id = $1
GROUP BY d.id ORDER BY d.created_at, d.id
"""


async def listing(conn: Connection, destination_id: str | None = None) -> list[dict[str, Any]]:
    """Every destination (or one) with `cursor`, `lag`, `pending`, `exhausted`, `last_error`..."""
    rows = await conn.fetch(LIST, destination_id)
    return [await _described(conn, row) for row in rows]


async def _described(conn: Connection, row: asyncpg.Record) -> dict[str, Any]:
    unscanned, oldest = await _unscanned(conn, row)
    oldest_owed = row["oldest_owed"]
    if oldest_owed is not None:
        owed_at = await conn.fetchval("SELECT received_at FROM events WHERE seq = $1", oldest_owed)
        oldest = owed_at if oldest is None or owed_at < oldest else oldest
    now = datetime.now(UTC)
    failing_since = row["failing_since"]
    return {
        "id": row["id"],
        "url": row["url"],
        "filter": json.loads(row["filter"]),
        "cursor": row["cursor"],
        "lag": unscanned + row["pending"],
        "lag_seconds": round((now - oldest).total_seconds(), 3) if oldest is not None else 0.0,
        "pending": row["pending"],
        "exhausted": row["exhausted"],
        "paused": row["paused"],
        "last_error": row["last_error"],
        "last_error_at": store.iso(row["last_error_at"]),
        "last_success_at": store.iso(row["last_success_at"]),
        "failing_since": store.iso(failing_since),
        "failing": failing_since is not None and now - failing_since >= FAILING_AFTER,
        "created_at": store.iso(row["created_at"]),
    }


async def _unscanned(conn: Connection, row: asyncpg.Record) -> tuple[int, datetime | None]:
    """Matching events past the cursor (counted up to LAG_COUNT_LIMIT), and when the first came."""
    where, args = event_filter(row["filter"]).starting_after(row["cursor"]).where()
    found = await conn.fetchrow(
        f"SELECT count(*) AS n, min(received_at) AS first FROM"
        f" (SELECT received_at FROM events WHERE {where} ORDER BY seq LIMIT {LAG_COUNT_LIMIT}) AS t",
        *args,
    )
    assert found is not None  # an aggregate always has its row
    return found["n"], found["first"]


async def one(conn: Connection, destination_id: str) -> dict[str, Any]:
    found = await listing(conn, destination_id)
    if not found:
        raise NotFound(f"no destination {destination_id[:80]!r}")
    return found[0]


async def remove(conn: Connection, destination_id: str) -> None:
    deleted = await conn.fetchval("DELETE FROM destinations WHERE id = $1 RETURNING id", destination_id)
    if deleted is None:
        raise NotFound(f"no destination {destination_id[:80]!r}")
    await conn.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, destination_id)


async def set_paused(conn: Connection, destination_id: str, paused: bool) -> dict[str, Any]:
    changed = await conn.fetchval(
        "UPDATE destinations SET paused = $2 WHERE id = $1 RETURNING id", destination_id, paused
    )
    if changed is None:
        raise NotFound(f"no destination {destination_id[:80]!r}")
    await conn.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, destination_id)
    return await one(conn, destination_id)


async def retry(conn: Connection, destination_id: str) -> int:
    """Re-queue the destination's exhausted events (sent again from the start of the schedule)."""
    async with conn.transaction():
        exists = await conn.fetchval("SELECT 1 FROM destinations WHERE id = $1 FOR UPDATE", destination_id)
        if exists is None:
            raise NotFound(f"no destination {destination_id[:80]!r}")
        requeued = await conn.fetchval(
            "WITH r AS (UPDATE destination_events SET state = 'owed', attempts = 0, next_at = now()"
            " WHERE destination_id = $1 AND state = 'exhausted' RETURNING 1) SELECT count(*) FROM r",
            destination_id,
        )
    await conn.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, destination_id)
    return int(requeued)
