"""All configuration, read once at start-up from the environment (and `relay serve` flags).

Nothing else in the package reads `os.environ`. Secrets are wrapped in `Secret` so that a
supplied secret never lands in a log line, an error or a repr.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

GENERATED_SECRETS_FILE = "secrets.json"


class Secret(str):
    """A string that hides itself when printed or logged."""

    def __repr__(self) -> str:
        return "Secret('**********')"


def decode_webhook_secret(text: str, name: str = "REPLICATE_WEBHOOK_SECRET") -> bytes:
    """The HMAC key of a `whsec_…` secret: its base64 part, decoded (padding optional)."""
    encoded = text.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"{name} must be whsec_ followed by base64 (as Replicate shows it); one entry is not valid base64"
        ) from None
    if not key:
        raise ConfigError(f"{name} has an empty secret; copy the full whsec_… value")
    return key


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: Secret | None = None
    data_dir: Path = Path(".relay")
    webhook_secrets: tuple[Secret, ...] = ()
    webhook_tolerance: int = 300
    max_body: int = 4 * 1024 * 1024
    admin_token: Secret | None = None
    subscribe_key: Secret | None = None
    api_keys: tuple[Secret, ...] = ()
    replicate_api_token: Secret | None = None
    replicate_api_base: str = "https://api.replicate.com/v1"
    public_url: str = ""
    encryption_keys: tuple[Secret, ...] = ()
    ws_queue_size: int = 1000
    upstream_timeout: int = 30
    upstream_retries: int = 3
    api_max_body: int = 1024 * 1024
    api_rate_limit: int = 100
    reconcile_after: int = 300
    reconcile_interval: int = 60
    generated: frozenset[str] = field(default_factory=frozenset)

    @property
    def webhook_keys(self) -> tuple[bytes, ...]:
        return tuple(decode_webhook_secret(s) for s in self.webhook_secrets)

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def webhook_url(self) -> str:
        return f"{self.base_url}/webhooks/replicate"

    @property
    def ws_base_url(self) -> str:
        return "ws" + self.base_url.removeprefix("http")

    @property
    def embedded(self) -> bool:
        return self.database_url is None


def _secret(env: Mapping[str, str], name: str) -> Secret | None:
    value = env.get(name, "").strip()
    return Secret(value) if value else None


def _secret_list(env: Mapping[str, str], name: str) -> tuple[Secret, ...]:
    return tuple(Secret(part) for part in env.get(name, "").split())


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    overrides: Mapping[str, str | None] | None = None,
    generate_missing: bool = True,
) -> Settings:
    """Read the environment; in dev mode (no DATABASE_URL) fill missing secrets from the data dir.

    With DATABASE_URL set, a missing required secret is a ConfigError, never generated silently.
    `overrides` are command-line flags, named like the variables they replace.
    `generate_missing=False` is for commands that only read (they use stored dev secrets if any).
    """
    env = dict(os.environ if env is None else env)
    env.update({name: value for name, value in (overrides or {}).items() if value is not None})
    database_url = _secret(env, "DATABASE_URL")
    data_dir = Path(env.get("RELAY_DATA_DIR") or ".relay")
    values: dict[str, object] = {
        "host": env.get("RELAY_HOST") or "127.0.0.1",
        "port": _int(env, "RELAY_PORT", 8000, minimum=0),
        "database_url": database_url,
        "data_dir": data_dir,
        "webhook_secrets": _secret_list(env, "REPLICATE_WEBHOOK_SECRET"),
        "webhook_tolerance": _int(env, "RELAY_WEBHOOK_TOLERANCE", 300),
        "max_body": _int(env, "RELAY_MAX_BODY", 4 * 1024 * 1024),
        "admin_token": _secret(env, "RELAY_ADMIN_TOKEN"),
        "subscribe_key": _secret(env, "RELAY_SUBSCRIBE_KEY"),
        "api_keys": _secret_list(env, "RELAY_API_KEYS"),
        "replicate_api_token": _secret(env, "REPLICATE_API_TOKEN") or _secret(env, "REPLICATE_API_KEY"),
        "replicate_api_base": (env.get("REPLICATE_API_BASE") or "https://api.replicate.com/v1").rstrip("/"),
        "public_url": (env.get("RELAY_PUBLIC_URL") or "").rstrip("/"),
        "encryption_keys": _secret_list(env, "RELAY_ENCRYPTION_KEY"),
        "ws_queue_size": _int(env, "RELAY_WS_QUEUE", 1000),
        "upstream_timeout": _int(env, "RELAY_UPSTREAM_TIMEOUT", 30),
        "upstream_retries": _int(env, "RELAY_UPSTREAM_RETRIES", 3, minimum=0),
        "api_max_body": _int(env, "RELAY_API_MAX_BODY", 1024 * 1024),
        "api_rate_limit": _int(env, "RELAY_API_RATE_LIMIT", 100),
        "reconcile_after": _int(env, "RELAY_RECONCILE_AFTER", 300),
        "reconcile_interval": _int(env, "RELAY_RECONCILE_INTERVAL", 60),
    }
    for secret in values["webhook_secrets"]:  # type: ignore[attr-defined]
        decode_webhook_secret(secret)
    if database_url is None:  # dev mode: never mix generated secrets into a real deployment
        values.update(_dev_secrets(values, data_dir, generate_missing))
    settings = Settings(**values)  # type: ignore[arg-type]
    if database_url is not None:
        _require_secrets(settings)
    return settings


_REQUIRED = {
    "webhook_secrets": "REPLICATE_WEBHOOK_SECRET",
    "admin_token": "RELAY_ADMIN_TOKEN",
    "subscribe_key": "RELAY_SUBSCRIBE_KEY",
}


def _require_secrets(settings: Settings) -> None:
    for attr, name in _REQUIRED.items():
        if not getattr(settings, attr):
            raise ConfigError(
                f"{name} is not set; with DATABASE_URL Relay generates no secrets, "
                f"so set {name} in the environment"
            )


def _new_secret(attr: str) -> Secret:
    if attr == "webhook_secrets":
        return Secret("whsec_" + base64.b64encode(secrets.token_bytes(24)).decode())
    return Secret(secrets.token_urlsafe(32))


def _dev_secrets(values: dict[str, object], data_dir: Path, generate: bool) -> dict[str, object]:
    """Missing secrets from `data_dir/secrets.json`, generated and stored there when allowed."""
    path = data_dir / GENERATED_SECRETS_FILE
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [attr for attr in _REQUIRED if not values[attr]]
    if not missing:
        return {}
    fresh = [attr for attr in missing if attr not in stored]
    if fresh and generate:
        for attr in fresh:
            stored[attr] = _new_secret(attr)
        data_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(stored, indent=2))
    found = {attr: Secret(stored[attr]) for attr in missing if attr in stored}
    if "webhook_secrets" in found:
        found["webhook_secrets"] = (found["webhook_secrets"],)
    return {**found, "generated": frozenset(found)}
