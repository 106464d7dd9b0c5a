"""AES-256-GCM sealing and key wrapping, the encryption-key settings, and the vault on a real database."""

from __future__ import annotations

import asyncio
import base64
import json

import asyncpg
import pytest

from service.core import crypto
from service.core.errors import ConfigError
from service.core.settings import load_settings
from service.db import store
from service.db.events import body_bytes
from service.db.vault import Vault
from service.ingest.committer import delivery_from
from service.ops.simulate import lifecycle

from .support import new_prediction_id, new_webhook_id

KEK_A = bytes(range(32))
KEK_B = bytes(range(100, 132))
NUL_BODY = b'{"id": "p1", "status": "processing",  "logs": "a\\u0000b", "input": {"prompt": "caf\xc3\xa9"}}'


def test_a_sealed_body_opens_to_the_exact_bytes():
    data_key = crypto.new_data_key()
    sealed = crypto.seal(data_key, NUL_BODY, "p1", "msg_1")
    assert b"caf" not in sealed and b"prompt" not in sealed
    assert crypto.open_sealed(data_key, sealed, "p1", "msg_1") == NUL_BODY


@pytest.mark.parametrize(
    "prediction_id, webhook_id", [("p2", "msg_1"), ("p1", "msg_2"), ("p", "1msg_1"), ("p1", "msg_1 ")]
)
def test_a_sealed_body_does_not_open_in_another_row(prediction_id, webhook_id):
    """A ciphertext moved to another row fails authentication instead of showing wrong data."""
    data_key = crypto.new_data_key()
    sealed = crypto.seal(data_key, NUL_BODY, "p1", "msg_1")
    with pytest.raises(crypto.Unreadable):
        crypto.open_sealed(data_key, sealed, prediction_id, webhook_id)


def test_an_altered_ciphertext_or_a_wrong_key_is_unreadable():
    data_key = crypto.new_data_key()
    sealed = crypto.seal(data_key, NUL_BODY, "p1", "msg_1")
    altered = sealed[:20] + bytes([sealed[20] ^ 1]) + sealed[21:]
    with pytest.raises(crypto.Unreadable):
        crypto.open_sealed(data_key, altered, "p1", "msg_1")
    with pytest.raises(crypto.Unreadable):
        crypto.open_sealed(crypto.new_data_key(), sealed, "p1", "msg_1")
    with pytest.raises(crypto.Unreadable, match="format"):
        crypto.open_sealed(data_key, b"\x07" + sealed[1:], "p1", "msg_1")


def test_a_wrapped_data_key_opens_only_for_its_prediction_and_key():
    data_key = crypto.new_data_key()
    wrapped = crypto.wrap(KEK_A, data_key, "p1")
    assert crypto.unwrap(KEK_A, wrapped, "p1") == data_key
    for kek, prediction_id in [(KEK_B, "p1"), (KEK_A, "p2")]:
        with pytest.raises(crypto.Unreadable):
            crypto.unwrap(kek, wrapped, prediction_id)


def test_key_ids_name_keys_without_revealing_them():
    assert crypto.key_id(KEK_A) == crypto.key_id(bytes(KEK_A))
    assert crypto.key_id(KEK_A) != crypto.key_id(KEK_B)
    assert KEK_A.hex()[:8] not in crypto.key_id(KEK_A)


def settings_with(tmp_path, value: str):
    env = {"RELAY_DATA_DIR": str(tmp_path), "RELAY_ENCRYPTION_KEY": value}
    return load_settings(env, generate_missing=False)


def test_encryption_keys_are_read_current_first(tmp_path):
    value = f"{base64.b64encode(KEK_B).decode()}  {base64.b64encode(KEK_A).decode()}"
    assert settings_with(tmp_path, value).key_encryption_keys == (KEK_B, KEK_A)
    assert settings_with(tmp_path, "").key_encryption_keys == ()


@pytest.mark.parametrize(
    "value", ["not-base64-at-all!!", base64.b64encode(b"sixteen byte key").decode(), "c2VjcmV0LXZhbHVl"]
)
def test_a_malformed_encryption_key_is_a_config_error_that_hides_it(tmp_path, value):
    good = base64.b64encode(KEK_A).decode()
    with pytest.raises(ConfigError, match="RELAY_ENCRYPTION_KEY entry 2 is not base64 of 32 bytes") as error:
        settings_with(tmp_path, f"{good} {value}")
    assert value not in str(error.value) and good not in str(error.value)


def delivery(prediction_id: str, index: int = 0) -> store.Delivery:
    body = json.dumps(lifecycle(prediction_id)[index]).encode()
    return delivery_from(json.loads(body), body, webhook_id=new_webhook_id(), source="webhook")


async def append_with(dsn: str, vault: Vault, deliveries: list[store.Delivery]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await store.append(conn, deliveries, vault.seal)
    finally:
        await conn.close()


async def read_rows(dsn: str, prediction_id: str) -> tuple[list[asyncpg.Record], int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await store.fetch_events(conn, prediction_id=prediction_id)
        keys = await conn.fetchval("SELECT count(*) FROM data_keys WHERE prediction_id = $1", prediction_id)
        return rows, keys
    finally:
        await conn.close()


def test_concurrent_first_deliveries_of_a_prediction_share_one_data_key(dsn):
    """Writers in separate transactions racing on a new prediction create one data key."""
    prediction_id = new_prediction_id()
    deliveries = [delivery(prediction_id, i) for i in range(4)]

    async def race() -> None:
        await asyncio.gather(*(append_with(dsn, Vault([KEK_A]), [d]) for d in deliveries))

    asyncio.run(race())
    rows, keys = asyncio.run(read_rows(dsn, prediction_id))
    assert keys == 1 and len(rows) == 4 and all(row["encrypted"] for row in rows)
    vault = Vault([KEK_A])
    assert sorted(body_bytes(row, vault) for row in rows) == sorted(d.body for d in deliveries)


def test_the_vault_refuses_a_missing_or_wrong_key_and_accepts_a_rotation_set(dsn):
    asyncio.run(append_with(dsn, Vault([KEK_A]), [delivery(new_prediction_id())]))

    async def check(vault: Vault) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await vault.check(conn)
        finally:
            await conn.close()

    with pytest.raises(ConfigError, match="RELAY_ENCRYPTION_KEY is not set"):
        asyncio.run(check(Vault()))
    with pytest.raises(ConfigError, match=f"lacks key-encryption key {crypto.key_id(KEK_A)}"):
        asyncio.run(check(Vault([KEK_B])))
    asyncio.run(check(Vault([KEK_B, KEK_A])))
