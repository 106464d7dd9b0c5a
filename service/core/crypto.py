"""AES-256-GCM for payloads at rest: per-prediction data keys wrapped by a key-encryption key.

Associated data binds every ciphertext to its place: a wrapped data key to its prediction, an
event's body to its prediction and webhook id. A ciphertext copied or swapped into another row
fails authentication (`Unreadable`) instead of decrypting as the wrong content.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
FORMAT = b"\x01"  # first byte of a sealed body, so a later format can be told apart


class Unreadable(Exception):
    """A ciphertext failed authentication: wrong key, or moved to a row it does not belong to."""


def key_id(kek: bytes) -> str:
    """A short public name for a key-encryption key, derived from it (so a wrong key is noticed)."""
    return hmac.new(kek, b"relay key-encryption key id", hashlib.sha256).hexdigest()[:16]


def _aad(purpose: bytes, *parts: str) -> bytes:
    # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    encoded = [part.encode() for part in parts]
    return purpose + b"".join(len(p).to_bytes(4, "big") + p for p in encoded)


def _encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _decrypt(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise Unreadable("authentication failed") from None


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=8 * KEY_BYTES)


def wrap(kek: bytes, data_key: bytes, prediction_id: str) -> bytes:
    return _encrypt(kek, data_key, _aad(b"relay data key", prediction_id))


def unwrap(kek: bytes, wrapped: bytes, prediction_id: str) -> bytes:
    return _decrypt(kek, wrapped, _aad(b"relay data key", prediction_id))


def seal(data_key: bytes, body: bytes, prediction_id: str, webhook_id: str) -> bytes:
    return FORMAT + _encrypt(data_key, body, _aad(b"relay event", prediction_id, webhook_id))


def open_sealed(data_key: bytes, sealed: bytes, prediction_id: str, webhook_id: str) -> bytes:
    if sealed[:1] != FORMAT:
        raise Unreadable("unknown ciphertext format")
    return _decrypt(data_key, sealed[1:], _aad(b"relay event", prediction_id, webhook_id))


def seal_secret(kek: bytes, secret: bytes, owner: str) -> bytes:
    """A secret Relay keeps (a destination's signing secret), bound to its owner's id."""
    return FORMAT + _encrypt(kek, secret, _aad(b"relay secret", owner))


def open_secret(kek: bytes, sealed: bytes, owner: str) -> bytes:
    if sealed[:1] != FORMAT:
        raise Unreadable("unknown ciphertext format")
    return _decrypt(kek, sealed[1:], _aad(b"relay secret", owner))


# Archived files are sealed in fixed-size chunks, so a file of any size is encrypted and served
# in constant memory. Each chunk's associated data names the file (prediction, SHA-256 of the
# plaintext), its index and whether it is the last: chunks cannot be reordered, swapped between
# files, or dropped from the end without failing authentication.
FILE_CHUNK = 64 * 1024
SEALED_FILE_CHUNK = NONCE_BYTES + FILE_CHUNK + 16  # nonce, ciphertext, GCM tag


def file_chunk_count(size: int) -> int:
    """How many chunks a sealed file of `size` plaintext bytes has (an empty file has one)."""
    return max(1, -(-size // FILE_CHUNK))


def _chunk_aad(prediction_id: str, sha256: str, index: int, final: bool) -> bytes:
    return _aad(b"relay archived file", prediction_id, sha256, str(index), "final" if final else "")


def seal_file_chunk(
    data_key: bytes, chunk: bytes, prediction_id: str, sha256: str, index: int, final: bool
) -> bytes:
    return _encrypt(data_key, chunk, _chunk_aad(prediction_id, sha256, index, final))


def open_file_chunk(
    data_key: bytes, sealed: bytes, prediction_id: str, sha256: str, index: int, final: bool
) -> bytes:
    return _decrypt(data_key, sealed, _chunk_aad(prediction_id, sha256, index, final))
