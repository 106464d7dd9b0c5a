"""Payloads at rest: each prediction's data key, wrapped by the key-encryption key(s).

`seal` encrypts a batch inside `store.append`, under the log's seq lock, so creating a data key
and forgetting one (an `erasure` event deletes it) are serialised with every insert. `plaintext`
opens a stored row, given the wrapped key that `store.EVENT_COLUMNS` reads with it; a row whose
key is gone is forgotten. Unwrapped keys are cached per process, keyed by the wrapped bytes, so
a forgotten or re-wrapped key is never served from the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from service.core import crypto
from service.core.errors import ConfigError
from service.db import database
from service.db.connection import Connection, Row
from service.db.store import Delivery, Prepare

ERASURE_SOURCE = "erasure"
ERASED_BODY = b'{"erased":true}'
CACHE_SIZE = 10_000
ROTATE_BATCH = 1000

SELECT_KEYS = "SELECT prediction_id, wrapped FROM data_keys WHERE prediction_id = ANY($1::text[])"

# A forgotten prediction (it has an erasure event) never gets a new key.
CREATE_KEYS = """
INSERT INTO data_keys (prediction_id, kek_id, wrapped)
SELECT p, $3, w FROM unnest($1::text[], $2::bytea[]) AS t(p, w)
WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.prediction_id = t.p AND e.source = 'erasure')
ON CONFLICT (prediction_id) DO NOTHING
RETURNING prediction_id
"""

# The distinct kek_ids by skipping through the index (a loose index scan), so the start-up
# check costs a few index probes however many data keys there are.
WRAPPING_KEY_IDS = """
WITH RECURSIVE ids(kek_id) AS (
    (SELECT kek_id FROM data_keys ORDER BY kek_id LIMIT 1)
    UNION ALL
    SELECT (SELECT k.kek_id FROM data_keys k WHERE k.kek_id > ids.kek_id ORDER BY k.kek_id LIMIT 1)
    FROM ids WHERE ids.kek_id IS NOT NULL
)
SELECT kek_id FROM ids WHERE kek_id IS NOT NULL
"""

REWRAP = """
UPDATE data_keys k SET kek_id = $1, wrapped = t.new
FROM unnest($2::text[], $3::bytea[], $4::bytea[]) AS t(p, old, new)
WHERE k.prediction_id = t.p AND k.wrapped = t.old
"""


class Vault:
    """The key-encryption keys (first current) and a cache of unwrapped data keys."""

    def __init__(self, keks: Sequence[bytes] = ()):
        self._keks = {crypto.key_id(kek): kek for kek in keks}
        self.current_id = next(iter(self._keks), None)
        self._cache: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.current_id is not None

    async def check(self, conn: Connection) -> None:
        """Refuse (ConfigError) when stored data keys are wrapped by a key not configured."""
        for kek_id in await wrapping_key_ids(conn):
            if not self.enabled:
                raise ConfigError(
                    f"the database holds encrypted payloads (key-encryption key {kek_id}) but "
                    "RELAY_ENCRYPTION_KEY is not set; set it to the key they were written with"
                )
            if kek_id not in self._keks:
                raise ConfigError(
                    f"RELAY_ENCRYPTION_KEY lacks key-encryption key {kek_id}, which wraps stored data "
                    "keys; add that key after the current one (then relay rotate-keys) or set the right key"
                )

    @property
    def prepare(self) -> Prepare | None:
        """The hook for `store.append`: `seal` when encryption is on. None when it is off, so
        appends stay one statement without a transaction around them."""
        return self.seal if self.enabled else None

    async def seal(self, conn: Connection, deliveries: list[Delivery]) -> list[Delivery]:
        """Encrypt a batch for storage (run by `store.append` under the seq lock).

        An erasure delivery deletes its prediction's data key; any delivery for a forgotten
        prediction keeps its id, status and times, and its content is replaced by ERASED_BODY.
        """
        if not self.enabled:
            return deliveries
        erasing = {d.prediction_id for d in deliveries if d.source == ERASURE_SOURCE}
        if erasing:
            await conn.execute("DELETE FROM data_keys WHERE prediction_id = ANY($1::text[])", list(erasing))
        keys = await self._data_keys(conn, {d.prediction_id for d in deliveries} - erasing)
        return [self._sealed(d, keys.get(d.prediction_id)) for d in deliveries]

    @staticmethod
    def _sealed(delivery: Delivery, data_key: bytes | None) -> Delivery:
        if delivery.source == ERASURE_SOURCE:
            return delivery
        if data_key is None:
            return replace(delivery, body=ERASED_BODY, encrypted=False)
        body = crypto.seal(data_key, delivery.body, delivery.prediction_id, delivery.webhook_id)
        return replace(delivery, body=body, encrypted=True)

    async def _data_keys(self, conn: Connection, prediction_ids: Iterable[str]) -> dict[str, bytes]:
        """Get or create the data key of each prediction; forgotten ones are left out."""
        ids = list(prediction_ids)
        keys = self._unwrap_rows(await conn.fetch(SELECT_KEYS, ids))
        missing = [p for p in ids if p not in keys]
        if not missing:
            return keys
        fresh = {p: crypto.new_data_key() for p in missing}
        wrapped = [crypto.wrap(self._keks[self.current_id], k, p) for p, k in fresh.items()]  # type: ignore[index]
        created = await conn.fetch(CREATE_KEYS, missing, wrapped, self.current_id)
        keys.update((r["prediction_id"], fresh[r["prediction_id"]]) for r in created)
        others = [p for p in missing if p not in keys]
        if others:  # created meanwhile by another transaction, or forgotten
            keys.update(self._unwrap_rows(await conn.fetch(SELECT_KEYS, others)))
        return keys

    def _unwrap_rows(self, rows: Iterable[Row]) -> dict[str, bytes]:
        return {r["prediction_id"]: self.data_key(r["prediction_id"], r["wrapped"]) for r in rows}

    def data_key(self, prediction_id: str, wrapped: bytes) -> bytes:
        """Unwrap with whichever configured key wraps it; `crypto.Unreadable` if none does."""
        cache_key = (prediction_id, wrapped)
        if (cached := self._cache.get(cache_key)) is not None:
            self._cache.move_to_end(cache_key)
            return cached
        for kek in self._keks.values():
            try:
                data_key = crypto.unwrap(kek, wrapped, prediction_id)
            except crypto.Unreadable:
                continue
            self._cache[cache_key] = data_key
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return data_key
        raise crypto.Unreadable("no configured key-encryption key unwraps this data key")

    def seal_secret(self, secret: str, owner: str) -> tuple[bytes, str | None]:
        """A secret to store: sealed under the current key, with its kek_id; in clear (None)
        when encryption is off."""
        if self.current_id is None:
            return secret.encode(), None
        return crypto.seal_secret(self._keks[self.current_id], secret.encode(), owner), self.current_id

    def open_secret(self, stored: bytes, kek_id: str | None, owner: str) -> str:
        """A stored secret in clear; `crypto.Unreadable` when its key is not configured."""
        if kek_id is None:
            return bytes(stored).decode()
        kek = self._keks.get(kek_id)
        if kek is None:
            raise crypto.Unreadable(f"key-encryption key {kek_id} is not in RELAY_ENCRYPTION_KEY")
        return crypto.open_secret(kek, bytes(stored), owner).decode()

    def plaintext(self, row: Row) -> bytes | None:
        """The exact bytes received for an encrypted row; None once its prediction is forgotten."""
        wrapped = row["data_key"]
        if wrapped is None:
            return None
        prediction_id = row["prediction_id"]
        data_key = self.data_key(prediction_id, wrapped)
        return crypto.open_sealed(data_key, row["body"], prediction_id, row["webhook_id"])

    async def rotate(self, conn: Connection, progress: Callable[[int, int], None]) -> int:
        """Re-wrap every data key under the current key; the log is untouched. Returns the count."""
        if not self.enabled:
            raise ConfigError("RELAY_ENCRYPTION_KEY is not set; put the new key first, then the old ones")
        await self.check(conn)
        current = self._keks[self.current_id]  # type: ignore[index]
        total = await conn.fetchval("SELECT count(*) FROM data_keys WHERE kek_id <> $1", self.current_id)
        done, after = 0, ""
        while rows := await conn.fetch(
            "SELECT prediction_id, wrapped FROM data_keys WHERE kek_id <> $1 AND prediction_id > $2"
            " ORDER BY prediction_id LIMIT $3",
            self.current_id,
            after,
            ROTATE_BATCH,
        ):
            ids = [r["prediction_id"] for r in rows]
            try:
                new = [
                    crypto.wrap(current, self.data_key(p, r["wrapped"]), p)
                    for p, r in zip(ids, rows, strict=True)
                ]
            except crypto.Unreadable:
                raise ConfigError(
                    f"a data key among predictions {ids[0]}..{ids[-1]} fails authentication; "
                    "it was altered in the database, restore it from a backup"
                ) from None
            await conn.execute(REWRAP, self.current_id, ids, [r["wrapped"] for r in rows], new)
            done, after = done + len(rows), ids[-1]
            progress(done, total)
        return done


async def check_keys(dsn: str, vault: Vault) -> None:
    """`Vault.check` on its own connection: a one-line ConfigError for a wrong or missing key."""
    conn = await database.connect(dsn)
    try:
        await vault.check(conn)
    finally:
        await conn.close()


async def wrapping_key_ids(conn: Connection) -> list[str]:
    return [r["kek_id"] for r in await conn.fetch(WRAPPING_KEY_IDS)]
