"""Who may read what: the admin token, API keys, and subscriber tokens (HS256 JWT).

A subscriber token carries `prediction` (an id, or `*` for all) and `exp`. A secret that is not
configured (None: settings read by a tool, or built by a test) lets nobody in.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping

import jwt

from service.core.errors import ConfigError, Forbidden, Unauthorized

ALL_PREDICTIONS = "*"
DEFAULT_TTL = 3600


def mint_token(key: str | None, prediction: str, ttl: int = DEFAULT_TTL) -> str:
    if key is None:
        raise ConfigError("RELAY_SUBSCRIBE_KEY is not set, so no subscriber token can be minted")
    claims = {"prediction": prediction, "exp": int(time.time()) + ttl}
    return jwt.encode(claims, key, algorithm="HS256")


def mint_batch_token(key: str | None, batch_id: str, ttl: int = DEFAULT_TTL) -> str:
    """A token for one batch's stream (`WS /batches/{id}/ws`): claim `batch`, and `exp`."""
    if key is None:
        raise ConfigError("RELAY_SUBSCRIBE_KEY is not set, so no batch token can be minted")
    return jwt.encode({"batch": batch_id, "exp": int(time.time()) + ttl}, key, algorithm="HS256")


def require_batch_reader(token: str | None, batch_id: str, admin_token: str | None, key: str | None) -> None:
    """Allow the admin token, or a token whose `batch` claim is this batch."""
    if token is None:
        raise Unauthorized("a token is required: ?token=<batch token> or Authorization: Bearer")
    if matches_any(token, [admin_token]):
        return
    if key is None:
        raise Forbidden("the batch token is not valid")
    try:
        claims = jwt.decode(token, key, algorithms=["HS256"], options={"require": ["exp"]})
    except jwt.ExpiredSignatureError:
        raise Forbidden("the batch token has expired; GET the batch again for a new one") from None
    except jwt.InvalidTokenError:
        raise Forbidden("the batch token is not valid") from None
    if claims.get("batch") != batch_id:
        raise Forbidden("the token is not for this batch")


def token_from(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The bearer token from `Authorization: Bearer …`, else from `?token=`."""
    header = headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return query.get("token") or None


def key_hash(key: str) -> str:
    """How a key is named in the database (quotas, owners, cache scopes): never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()


def matches_any(token: str, secrets: Iterable[str | None]) -> bool:
    """Constant-time comparison against each configured secret (an unset one matches nothing)."""
    found = False
    for secret in secrets:
        if secret is not None:
            found |= hmac.compare_digest(token.encode(), secret.encode())
    return found


def token_prediction(token: str, key: str | None) -> str:
    """The `prediction` claim of a valid subscriber token; Forbidden otherwise."""
    if key is None:
        raise Forbidden("the subscriber token is not valid")
    try:
        claims = jwt.decode(token, key, algorithms=["HS256"], options={"require": ["exp"]})
    except jwt.ExpiredSignatureError:
        raise Forbidden("the subscriber token has expired; mint a new one") from None
    except jwt.InvalidTokenError:
        raise Forbidden("the subscriber token is not valid") from None
    prediction = claims.get("prediction")
    if not isinstance(prediction, str) or not prediction:
        raise Forbidden("the subscriber token has no prediction claim")
    return prediction


def require_admin(token: str | None, admin_token: str | None) -> None:
    if token is None:
        raise Unauthorized("an admin token is required: Authorization: Bearer <RELAY_ADMIN_TOKEN>")
    if not matches_any(token, [admin_token]):
        raise Forbidden("the admin token is not valid")


def require_api_key(token: str | None, admin_token: str | None, api_keys: Iterable[str]) -> str:
    """The caller's key for the predictions API: the admin token or one of RELAY_API_KEYS."""
    if token is None:
        raise Unauthorized("an API key is required: Authorization: Bearer <a key from RELAY_API_KEYS>")
    if not matches_any(token, [admin_token, *api_keys]):
        raise Forbidden("the API key is not valid; use the admin token or a key from RELAY_API_KEYS")
    return token


def require_reader(
    token: str | None, prediction_id: str | None, admin_token: str | None, key: str | None
) -> None:
    """Allow the admin token, or a subscriber token for this prediction (or `*`).

    `prediction_id=None` means "all predictions", which only the admin token or `*` may read.
    """
    if token is None:
        raise Unauthorized("a token is required: ?token=<subscriber token> or Authorization: Bearer")
    if matches_any(token, [admin_token]):
        return
    allowed = token_prediction(token, key)
    if allowed != ALL_PREDICTIONS and allowed != prediction_id:
        raise Forbidden("the subscriber token is for another prediction")
