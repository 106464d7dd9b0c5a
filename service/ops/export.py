"""`relay export`: the log as JSON Lines, streamed through a server-side cursor.

One object a line: `seq, webhook_id, prediction_id, status, source, received_at,
webhook_timestamp` and `body`, the exact received text, or `body_b64` when the stored bytes are
not valid UTF-8. `body.encode("utf-8")` (or the base64 decoding) gives back the stored bytes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import asyncpg

from service.core.filters import EventFilter
from service.db import store
from service.db.connection import Connection
from service.db.events import body_bytes
from service.db.store import iso
from service.db.vault import Vault

PREFETCH = 1000


@dataclass
class Written:
    """How far an export got: its lines are whole and in seq order, so a run stopped part way
    carries on with `--after last_seq`."""

    count: int = 0
    last_seq: int | None = None


def export_record(row: asyncpg.Record, vault: Vault) -> dict[str, Any]:
    record: dict[str, Any] = {
        "seq": row["seq"],
        "webhook_id": row["webhook_id"],
        "prediction_id": row["prediction_id"],
        "status": row["status"],
        "source": row["source"],
        "received_at": iso(row["received_at"]),
        "webhook_timestamp": iso(row["webhook_timestamp"]),
    }
    body = body_bytes(row, vault)
    try:
        record["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        record["body_b64"] = base64.b64encode(body).decode("ascii")
    return record


def export_line(row: asyncpg.Record, vault: Vault) -> str:
    return json.dumps(export_record(row, vault), ensure_ascii=False, separators=(",", ":")) + "\n"


async def export(
    conn: Connection,
    event_filter: EventFilter,
    out: TextIO,
    vault: Vault,
    progress: Callable[[int], None] = lambda n: None,
    written: Written | None = None,
) -> int:
    """Write every matching event to `out` in seq order; memory stays flat whatever the count.
    `written` follows each line, for a run that is interrupted."""
    where, args = event_filter.where()
    done = Written() if written is None else written
    async with conn.transaction(readonly=True):
        async for row in conn.cursor(store.select_where(where), *args, prefetch=PREFETCH):
            out.write(export_line(row, vault))
            done.count += 1
            done.last_seq = row["seq"]
            progress(1)
    return done.count
