"""The one shape an event has for readers: HTTP pages, WebSocket messages, replays.

`body_bytes` is the one place where stored bodies are decrypted: every reader goes through it
(or `open_body`), with rows read with `store.EVENT_COLUMNS` and the process's `Vault`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import asyncpg

from service.core.crypto import Unreadable
from service.db.connection import Row
from service.db.store import iso
from service.db.vault import ERASED_BODY, Vault

log = logging.getLogger("relay.events")

UNREADABLE_BODY = b'{"unreadable":true}'


def body_bytes(row: Row, vault: Vault) -> bytes:
    """The exact bytes delivered; `{"erased":true}` once the prediction is forgotten, and
    `{"unreadable":true}` (logged) when the ciphertext fails authentication."""
    if not row["encrypted"]:
        body: bytes = row["body"]
        return body
    try:
        plaintext = vault.plaintext(row)
    except Unreadable:
        log.error(
            "event seq %s of prediction %s fails authentication (altered or moved ciphertext, "
            "or a wrong key); its content is withheld",
            row["seq"],
            row["prediction_id"],
        )
        return UNREADABLE_BODY
    return ERASED_BODY if plaintext is None else plaintext


def open_body(row: Row, vault: Vault) -> Any:
    """The delivered prediction object of a stored row (see `body_bytes`)."""
    return json.loads(body_bytes(row, vault))


def event_fields(row: Row, *, replayed: bool = False) -> dict[str, Any]:
    return {
        "type": "event",
        "seq": row["seq"],
        "prediction_id": row["prediction_id"],
        "status": row["status"],
        "webhook_id": row["webhook_id"],
        "source": row["source"],
        "received_at": iso(row["received_at"]),
        "replayed": replayed,
    }


def event_message(row: Row, vault: Vault, *, replayed: bool = False) -> dict[str, Any]:
    return {**event_fields(row, replayed=replayed), "prediction": open_body(row, vault)}


def event_text(row: Row, vault: Vault, *, replayed: bool = False) -> str:
    """`event_message` as JSON text, with the stored body spliced in unparsed: ingest stores only
    UTF-8 JSON, and parsing and re-encoding each body was most of the fan-out's encoding cost."""
    head = dumps(event_fields(row, replayed=replayed))
    return f'{head[:-1]},"prediction":{body_bytes(row, vault).decode()}}}'


# One encoder for every message: json.dumps builds a new one per call when given separators.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def dumps(message: dict[str, Any]) -> str:
    return _COMPACT.encode(message)


def page_text(rows: list[asyncpg.Record], vault: Vault, after: int) -> str:
    """`{"events": [...], "next_after": SEQ}` for the rows read past `after`, each body spliced in
    as delivered (`event_text`): a page serves the same bytes that were stored. `next_after` is
    the last row's seq, or `after` again when there are none."""
    events = ",".join(event_text(row, vault) for row in rows)
    next_after = rows[-1]["seq"] if rows else after
    return f'{{"events":[{events}],"next_after":{int(next_after)}}}'


PREDICTION_FIELDS = ("output", "error", "logs", "metrics", "created_at", "started_at", "completed_at")


def prediction_state(row: asyncpg.Record, vault: Vault) -> dict[str, Any]:
    """`GET /predictions/{id}`: the projection plus the latest fields of the state event
    (and `"erased": true` once the prediction is forgotten)."""
    body = open_body(row, vault)
    state = {
        "id": row["prediction_id"],
        "status": row["status"],
        "last_seq": row["last_seq"],
        "event_count": row["event_count"],
    }
    state.update({name: body.get(name) if isinstance(body, dict) else None for name in PREDICTION_FIELDS})
    if body == {"erased": True}:
        state["erased"] = True
    return state
