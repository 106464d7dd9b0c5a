"""All configuration, read once at start-up from the environment (and `relay serve` flags).

Nothing else in the package reads `os.environ`. Secrets are wrapped in `Secret` so that a
supplied secret never lands in a log line, an error or a repr.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from service.core.errors import ConfigError
from service.core.origins import ANY, normal_origin

GENERATED_SECRETS_FILE = "secrets.json"


class Secret(str):
    """A string that hides itself when printed or logged."""

    def __repr__(self) -> str:
        return "Secret('**********')"


# A `whsec_` secret that decode_webhook_secret accepts: non-empty base64, padding optional.
WHSEC_PATTERN = (
    r"^whsec_(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=?|[A-Za-z0-9+/]{2}(?:==)?)$"
)


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


def decode_encryption_key(text: str, position: int) -> bytes:
    """One RELAY_ENCRYPTION_KEY entry: base64 of exactly 32 bytes (AES-256)."""
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigError(
            f"RELAY_ENCRYPTION_KEY entry {position} is not base64 of 32 bytes; make one with "
            "python3 -c 'import base64,os; print(base64.b64encode(os.urandom(32)).decode())'"
        )
    return key


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(env: Mapping[str, str]) -> str:
    level = (env.get("RELAY_LOG_LEVEL") or "INFO").upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"RELAY_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level[:20]!r}")
    return level


LOG_FORMATS = ("text", "json")


def _log_format(env: Mapping[str, str]) -> str:
    value = (env.get("RELAY_LOG_FORMAT") or "text").lower()
    if value not in LOG_FORMATS:
        raise ConfigError(f"RELAY_LOG_FORMAT must be text or json, got {value[:20]!r}")
    return value


def _on_off(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw not in ("on", "off", "true", "false", "1", "0"):
        raise ConfigError(f"{name} must be on or off, got {raw[:20]!r}")
    return raw in ("on", "true", "1")


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


def _usd(raw: str, name: str, *, rule: str = "0 or more", positive: bool = False) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ConfigError(f"{name} must be a number of US dollars ({rule}), got {raw[:40]!r}")
    return value


def _prices(env: Mapping[str, str]) -> dict[str, float]:
    """`RELAY_PRICES`: space-separated `model=price` pairs, price in USD per second."""
    prices = {}
    for entry in env.get("RELAY_PRICES", "").split():
        model, sep, price = entry.rpartition("=")
        if not sep or not model:
            raise ConfigError(
                f"RELAY_PRICES entry {entry[:60]!r} is not model=price (USD per second), "
                "e.g. RELAY_PRICES='qwen/qwen-image-edit-plus=0.0014'"
            )
        prices[model] = _usd(price, f"RELAY_PRICES price of {model[:60]!r}")
    return prices


def _budget(env: Mapping[str, str]) -> float | None:
    raw = env.get("RELAY_BUDGET", "").strip()
    if not raw:
        return None
    return _usd(raw, "RELAY_BUDGET", rule="more than 0 a month; unset it for no budget", positive=True)


def _origins(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list of origins (`https://app.example.com`) or `*`, as browsers send them."""
    origins = []
    for entry in filter(None, (part.strip() for part in env.get(name, "").split(","))):
        origin = ANY if entry == ANY else normal_origin(entry)
        if origin is None:
            raise ConfigError(
                f"{name} entry {entry[:80]!r} is not an origin; write scheme://host[:port] "
                "(no path), e.g. https://app.example.com, comma-separated, or *"
            )
        origins.append(origin)
    return tuple(origins)


@dataclass(frozen=True)
class Flag:
    """A `relay serve` flag: the command-line form of one variable (the flag wins)."""

    name: str
    variable: str
    help: str
    type: type = str
    secret: bool = False


# Every variable `relay serve` reads, as a flag. Secrets are accepted as flags too, but a flag is
# visible to every user of the machine (`ps`), so the environment is the place for them.
SERVE_FLAGS = (
    Flag("--host", "RELAY_HOST", "interface to listen on (default 127.0.0.1)"),
    Flag("--port", "RELAY_PORT", "port to listen on (default 8000)", int),
    Flag("--workers", "RELAY_WORKERS", "worker processes sharing the database (default 1)", int),
    Flag("--database-url", "DATABASE_URL", "Postgres DSN (default: embedded Postgres)", secret=True),
    Flag("--data-dir", "RELAY_DATA_DIR", "local state: embedded cluster, dev secrets (default ./.relay)"),
    Flag("--webhook-secret", "REPLICATE_WEBHOOK_SECRET", "whsec_… secret(s), space-separated", secret=True),
    Flag("--webhook-tolerance", "RELAY_WEBHOOK_TOLERANCE", "max webhook-timestamp skew, seconds", int),
    Flag("--max-body", "RELAY_MAX_BODY", "largest webhook body, bytes", int),
    Flag("--admin-token", "RELAY_ADMIN_TOKEN", "bearer token for /admin/* and /events/ws", secret=True),
    Flag("--subscribe-key", "RELAY_SUBSCRIBE_KEY", "HS256 key for subscriber tokens", secret=True),
    Flag("--api-keys", "RELAY_API_KEYS", "API keys for /api/*, space-separated", secret=True),
    Flag("--replicate-api-token", "REPLICATE_API_TOKEN", "token for the predictions API proxy", secret=True),
    Flag("--replicate-api-base", "REPLICATE_API_BASE", "upstream API base URL"),
    Flag("--public-url", "RELAY_PUBLIC_URL", "public base URL, for the webhook URL"),
    Flag("--encryption-key", "RELAY_ENCRYPTION_KEY", "key-encryption key(s), space-separated", secret=True),
    Flag("--log-level", "RELAY_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR"),
    Flag("--ws-queue", "RELAY_WS_QUEUE", "messages queued per subscriber before 1013", int),
    Flag("--ws-ping", "RELAY_WS_PING", "WebSocket ping interval, seconds", int),
    Flag("--prices", "RELAY_PRICES", "model=USD-per-second pairs, space-separated"),
    Flag("--budget", "RELAY_BUDGET", "monthly budget, USD"),
    Flag("--budget-interval", "RELAY_BUDGET_INTERVAL", "budget check period, seconds", int),
    Flag("--metrics-dir", "PROMETHEUS_MULTIPROC_DIR", "where --workers processes write metrics"),
    Flag("--upstream-timeout", "RELAY_UPSTREAM_TIMEOUT", "Replicate API timeout, seconds", int),
    Flag("--upstream-retries", "RELAY_UPSTREAM_RETRIES", "Replicate API retries", int),
    Flag("--api-max-body", "RELAY_API_MAX_BODY", "largest /api/* request body, bytes", int),
    Flag("--api-rate-limit", "RELAY_API_RATE_LIMIT", "/api/* requests per key per hour", int),
    Flag("--reconcile-after", "RELAY_RECONCILE_AFTER", "seconds without an event before reconciling", int),
    Flag("--reconcile-interval", "RELAY_RECONCILE_INTERVAL", "reconcile period, seconds", int),
    Flag("--allowed-origins", "RELAY_ALLOWED_ORIGINS", "origins that may open streams, comma-separated"),
    Flag("--cors-origins", "RELAY_CORS_ORIGINS", "origins that may call /api/*, comma-separated"),
    # API surface: the prediction cache and JSON logs
    Flag("--cache-ttl", "RELAY_CACHE_TTL", "seconds a succeeded prediction may answer an identical one", int),
    Flag("--log-format", "RELAY_LOG_FORMAT", "text or json (one object a line)"),
    Flag("--access-log", "RELAY_ACCESS_LOG", "on or off: one line per HTTP request, tokens redacted"),
)


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
    log_level: str = "INFO"
    ws_queue_size: int = 1000
    ws_ping_interval: int = 20
    prices: dict[str, float] = field(default_factory=dict)
    budget: float | None = None
    budget_interval: int = 60
    workers: int = 1
    metrics_dir: Path | None = None
    upstream_timeout: int = 30
    upstream_retries: int = 3
    api_max_body: int = 1024 * 1024
    api_rate_limit: int = 100
    reconcile_after: int = 300
    reconcile_interval: int = 60
    allowed_origins: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    # API surface: the prediction cache and JSON logs
    cache_ttl: int = 86400
    log_format: str = "text"
    access_log: bool = True
    generated: frozenset[str] = field(default_factory=frozenset)
    flags: dict[str, str] = field(default_factory=dict, repr=False)  # given on the command line

    @property
    def webhook_keys(self) -> tuple[bytes, ...]:
        return tuple(decode_webhook_secret(s) for s in self.webhook_secrets)

    @property
    def key_encryption_keys(self) -> tuple[bytes, ...]:
        """The decoded RELAY_ENCRYPTION_KEY entries, current first; empty when encryption is off."""
        return tuple(decode_encryption_key(k, i) for i, k in enumerate(self.encryption_keys, 1))

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
    required: Collection[str] | None = None,
) -> Settings:
    """Read the environment; in dev mode (no DATABASE_URL) fill missing secrets from the data dir.

    With DATABASE_URL set, a missing required secret is a ConfigError, never generated silently.
    `overrides` are command-line flags, named like the variables they replace.
    `generate_missing=False` is for commands that only read (they use stored dev secrets if any).
    `required` names the secrets the command needs when DATABASE_URL is set (default: all).
    """
    flags = {name: value for name, value in (overrides or {}).items() if value is not None}
    env = {**(os.environ if env is None else env), **flags}
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
        "log_level": _log_level(env),
        "ws_queue_size": _int(env, "RELAY_WS_QUEUE", 1000),
        "ws_ping_interval": _int(env, "RELAY_WS_PING", 20),
        "prices": _prices(env),
        "budget": _budget(env),
        "budget_interval": _int(env, "RELAY_BUDGET_INTERVAL", 60),
        "workers": _int(env, "RELAY_WORKERS", 1),
        "metrics_dir": Path(env["PROMETHEUS_MULTIPROC_DIR"]) if env.get("PROMETHEUS_MULTIPROC_DIR") else None,
        "upstream_timeout": _int(env, "RELAY_UPSTREAM_TIMEOUT", 30),
        "upstream_retries": _int(env, "RELAY_UPSTREAM_RETRIES", 3, minimum=0),
        "api_max_body": _int(env, "RELAY_API_MAX_BODY", 1024 * 1024),
        "api_rate_limit": _int(env, "RELAY_API_RATE_LIMIT", 100),
        "reconcile_after": _int(env, "RELAY_RECONCILE_AFTER", 300),
        "reconcile_interval": _int(env, "RELAY_RECONCILE_INTERVAL", 60),
        "allowed_origins": _origins(env, "RELAY_ALLOWED_ORIGINS"),
        "cors_origins": _origins(env, "RELAY_CORS_ORIGINS"),
        # API surface: the prediction cache and JSON logs
        "cache_ttl": _int(env, "RELAY_CACHE_TTL", 86400),
        "log_format": _log_format(env),
        "access_log": _on_off(env, "RELAY_ACCESS_LOG", True),
        "flags": flags,
    }
    for secret in values["webhook_secrets"]:  # type: ignore[attr-defined]
        decode_webhook_secret(secret)
    for position, key in enumerate(values["encryption_keys"], 1):  # type: ignore[arg-type]
        decode_encryption_key(key, position)
    if database_url is None:  # dev mode: never mix generated secrets into a real deployment
        values.update(_dev_secrets(values, data_dir, generate_missing))
    settings = Settings(**values)  # type: ignore[arg-type]
    if database_url is not None:
        _require_secrets(settings, required)
    return settings


def tool_settings() -> Settings:
    """Settings for an operator command: it uses stored dev secrets if any, generates none, and
    needs none of the server's secrets (each command checks what it actually uses)."""
    return load_settings(generate_missing=False, required=())


_REQUIRED = {
    "webhook_secrets": "REPLICATE_WEBHOOK_SECRET",
    "admin_token": "RELAY_ADMIN_TOKEN",
    "subscribe_key": "RELAY_SUBSCRIBE_KEY",
}


def _require_secrets(settings: Settings, required: Collection[str] | None) -> None:
    for attr, name in _REQUIRED.items():
        if (required is None or attr in required) and not getattr(settings, attr):
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


def worker_environment(settings: Settings, dsn: str, metrics_dir: Path) -> dict[str, str]:
    """What `relay serve --workers N` hands its workers: the database it started or was given,
    the secrets it read or generated, its flags, and where the metrics of all workers meet."""
    return {
        **settings.flags,
        "DATABASE_URL": dsn,
        "REPLICATE_WEBHOOK_SECRET": " ".join(settings.webhook_secrets),
        "RELAY_ADMIN_TOKEN": str(settings.admin_token),
        "RELAY_SUBSCRIBE_KEY": str(settings.subscribe_key),
        "RELAY_HOST": settings.host,
        "RELAY_PORT": str(settings.port),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
