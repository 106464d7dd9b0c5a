"""All configuration, read once at start-up from the environment (and `relay serve` flags).

Nothing else in the package reads `os.environ`. Secrets are wrapped in `Secret` so that a
supplied secret never lands in a log line, an error or a repr.

The `Settings` class below is the one table of settings: each field is one `setting(...)` naming
its variable, its `relay serve` flag, its default, its parser (which validates), its help and
whether it is secret. `SERVE_FLAGS`, `load_settings` and the docs' configuration page
(docs/hooks/settings_table.py) all derive from it, so a default is written once.

Adding a setting is one field in that table, under the comment naming its feature (the comment
heads that feature's section of the configuration page):

    archive_max_bytes: int = setting(
        "RELAY_ARCHIVE_MAX_BYTES", "--archive-max-bytes", 100 * MIB, whole(), "largest output file, bytes"
    )

Converting one written the old way (a `Flag` in SERVE_FLAGS, a field, a `load_settings` line):
the field's type and name stay; its default, the Flag's name and help, and the parser of the
`load_settings` line (`_int(env, NAME, default)` -> `whole()`, `env.get(NAME) or "x"` -> `text`,
`_secret` -> `secret`, `_secret_list` -> `secret_list`, anything else -> a small `(raw, name)`
function next to the others) go into the field's `setting(...)`; then delete the Flag and the line.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import os
import secrets
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from service.core.errors import ConfigError
from service.core.hosts import DEFAULT_ARCHIVE_HOSTS, HostPolicy
from service.core.origins import ANY, normal_origin
from service.core.retry import DEFAULT_SCHEDULE, parse_schedule

GENERATED_SECRETS_FILE = "secrets.json"

T = TypeVar("T")


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


# Parsers: each turns a variable's raw, non-empty text into its value, or raises ConfigError
# with one line naming the variable. Returning None means "not given": the default applies.
Parser = Callable[[str, str], Any]


def text(raw: str, name: str) -> str:
    return raw


def base_url(raw: str, name: str) -> str:
    """An http(s) URL that paths are appended to: no trailing slash. Without its scheme
    (`relay.example.com`) it would become a webhook URL Replicate cannot call."""
    url = raw.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(
            f"{name} must be an http:// or https:// URL such as https://relay.example.com "
            f"(no query), got {raw[:80] if '@' not in raw else 'a URL with credentials'!r}"
        )
    return url


def path(raw: str, name: str) -> Path:
    return Path(raw)


def whole(minimum: int = 1, maximum: int | None = None) -> Parser:
    """A whole number, at least `minimum` (and at most `maximum`)."""

    def parse(raw: str, name: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {raw[:40]!r}") from None
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name} must be at most {maximum}, got {value}")
        return value

    return parse


def secret(raw: str, name: str) -> Secret | None:
    value = raw.strip()
    return Secret(value) if value else None


def secret_list(raw: str, name: str) -> tuple[Secret, ...]:
    """Space-separated secrets."""
    return tuple(Secret(part) for part in raw.split())


def webhook_secrets(raw: str, name: str) -> tuple[Secret, ...]:
    """Space-separated `whsec_…` secrets, each checked to decode."""
    found = secret_list(raw, name)
    for entry in found:
        decode_webhook_secret(entry)
    return found


def encryption_keys(raw: str, name: str) -> tuple[Secret, ...]:
    """Space-separated base64 32-byte keys, current first, each checked to decode."""
    found = secret_list(raw, name)
    for position, key in enumerate(found, 1):
        decode_encryption_key(key, position)
    return found


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_level(raw: str, name: str) -> str:
    level = raw.upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"{name} must be one of {', '.join(LOG_LEVELS)}, got {level[:20]!r}")
    return level


LOG_FORMATS = ("text", "json")


def log_format(raw: str, name: str) -> str:
    value = raw.strip().lower()
    if value not in LOG_FORMATS:
        raise ConfigError(f"{name} must be text or json, got {value[:20]!r}")
    return value


def _usd(raw: str, name: str, *, rule: str = "0 or more", positive: bool = False) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ConfigError(f"{name} must be a number of US dollars ({rule}), got {raw[:40]!r}")
    return value


def prices(raw: str, name: str) -> dict[str, float]:
    """Space-separated `model=price` pairs, price in USD per second."""
    found = {}
    for entry in raw.split():
        model, sep, price = entry.rpartition("=")
        if not sep or not model:
            raise ConfigError(
                f"{name} entry {entry[:60]!r} is not model=price (USD per second), "
                "e.g. RELAY_PRICES='qwen/qwen-image-edit-plus=0.0014'"
            )
        found[model] = _usd(price, f"{name} price of {model[:60]!r}")
    return found


def budget(raw: str, name: str) -> float | None:
    raw = raw.strip()
    if not raw:
        return None
    return _usd(raw, name, rule="more than 0 a month; unset it for no budget", positive=True)


def origins(raw: str, name: str) -> tuple[str, ...]:
    """A comma-separated list of origins (`https://app.example.com`) or `*`, as browsers send them."""
    found = []
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        origin = ANY if entry == ANY else normal_origin(entry)
        if origin is None:
            raise ConfigError(
                f"{name} entry {entry[:80]!r} is not an origin; write scheme://host[:port] "
                "(no path), e.g. https://app.example.com, comma-separated, or *"
            )
        found.append(origin)
    return tuple(found)


def schedule(raw: str, name: str) -> tuple[float, ...]:
    """Comma-separated delays in seconds (core.retry)."""
    return parse_schedule(raw, name)


# Output archive
def archive_store(raw: str, name: str) -> str:
    """`file:///absolute/path`, `s3://bucket[/prefix]` or `off` (unset: RELAY_DATA_DIR/files)."""
    url = raw.strip()
    is_file = url.startswith("file:///") and len(url) > len("file:///")
    is_s3 = url.startswith("s3://") and len(url.rstrip("/")) > len("s3://")
    if url != "off" and not is_file and not is_s3:
        raise ConfigError(
            f"{name} must be file:///absolute/path, s3://bucket[/prefix] or off, got {url[:80]!r}"
        )
    return url if url == "off" else url.rstrip("/")


def archive_hosts(raw: str, name: str) -> tuple[str, ...]:
    entries = tuple(raw.split())
    HostPolicy(entries, name)  # a ConfigError naming a malformed entry
    return entries


def simulate_outputs_port(relay_port: int) -> int:
    """Where `relay simulate --serve-outputs` serves its files: the port after Relay's own, an
    origin that a dev instance (no DATABASE_URL) allows out of the box."""
    return relay_port + 1


def _archive_defaults(env: Mapping[str, str], values: dict[str, object]) -> dict[str, object]:
    """The defaults that depend on other settings: the store in RELAY_DATA_DIR, and in dev mode
    the origin of `relay simulate --serve-outputs` on top of Replicate's."""
    found: dict[str, object] = {}
    if not values["archive"]:
        found["archive"] = (Path(str(values["data_dir"])).resolve() / "files").as_uri()
    port = values["port"]
    if (
        values["database_url"] is None
        and not env.get("RELAY_ARCHIVE_HOSTS")
        and isinstance(port, int)
        and port
    ):
        found["archive_hosts"] = (*DEFAULT_ARCHIVE_HOSTS, f"http://127.0.0.1:{simulate_outputs_port(port)}")
    return found


POOLERS = ("off", "transaction")


def pooler(raw: str, name: str) -> str:
    mode = raw.strip().lower()
    if mode not in POOLERS:
        raise ConfigError(
            f"{name} must be off or transaction (PgBouncer's pool_mode=transaction), got {mode[:20]!r}"
        )
    return mode


@dataclass(frozen=True)
class Setting:
    """One row of the settings table (kept in the metadata of its `Settings` field)."""

    variable: str
    flag: str
    default: object
    parse: Parser
    help: str
    secret: bool = False
    unset: str = ""  # what an unset variable means, where the default value alone does not say
    aliases: tuple[str, ...] = ()  # older names, read when the variable is not set

    @property
    def default_text(self) -> str:
        """The default as the docs and `--help` show it."""
        if self.unset:
            return self.unset
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if self.default is None or self.default in ("", (), {}):
            return ""
        if isinstance(self.default, Path) and not self.default.is_absolute():
            return f"./{self.default}"
        return str(self.default)


def setting(
    variable: str,
    flag: str,
    default: T,
    parse: Parser,
    help: str,
    *,
    secret: bool = False,
    unset: str = "",
    aliases: tuple[str, ...] = (),
) -> T:
    """A `Settings` field read from `variable` (or the `relay serve` flag) by `parse`."""
    row = Setting(variable, flag, default, parse, help, secret, unset, aliases)
    metadata = {"setting": row}
    if isinstance(default, dict):  # mutable: each Settings gets its own copy
        return field(default_factory=lambda: dict(default), metadata=metadata)  # type: ignore[return-value]
    return field(default=default, metadata=metadata)


SWITCH_VALUES = {
    "1": True,
    "on": True,
    "true": True,
    "yes": True,
    "0": False,
    "off": False,
    "false": False,
    "no": False,
}


def on_off(raw: str, name: str) -> bool:
    """An on/off variable (on, off, true, false, yes, no, 1, 0)."""
    value = raw.strip().lower()
    if value not in SWITCH_VALUES:
        raise ConfigError(f"{name} must be on or off, got {raw[:20]!r}")
    return SWITCH_VALUES[value]


@dataclass(frozen=True)
class Flag:
    """A `relay serve` flag: the command-line form of one variable (the flag wins)."""

    name: str
    variable: str
    help: str
    type: type = str
    secret: bool = False


def serve_flag(row: Setting) -> Flag:
    """The `relay serve` flag of a setting; its help ends with the default."""
    kind = int if isinstance(row.default, int) and not isinstance(row.default, bool) else str
    if row.unset:
        shown = f" (unset: {row.unset})"
    else:
        shown = f" (default {row.default_text})" if row.default_text else ""
    return Flag(row.flag, row.variable, row.help + shown, kind, row.secret)


MIB = 1024 * 1024
DEFAULT_SCHEDULE_TEXT = ",".join(f"{delay:g}" for delay in DEFAULT_SCHEDULE)
DEV_SECRET = "generated in dev mode"  # noqa: S105 - what the docs show as the default, not a secret


@dataclass(frozen=True)
class Settings:
    """The settings table: one `setting(variable, flag, default, parser, help)` per field.

    Secrets are accepted as flags too, but a flag is visible to every user of the machine (`ps`),
    so the environment is the place for them.
    """

    # Server
    host: str = setting("RELAY_HOST", "--host", "127.0.0.1", text, "interface to listen on")
    port: int = setting("RELAY_PORT", "--port", 8000, whole(minimum=0, maximum=65535), "port to listen on")
    workers: int = setting("RELAY_WORKERS", "--workers", 1, whole(), "worker processes sharing the database")
    database_url: Secret | None = setting(
        "DATABASE_URL", "--database-url", None, secret, "Postgres DSN",
        secret=True, unset="embedded Postgres in RELAY_DATA_DIR",
    )  # fmt: skip
    data_dir: Path = setting(
        "RELAY_DATA_DIR", "--data-dir", Path(".relay"), path, "local state: embedded cluster, dev secrets"
    )
    public_url: str = setting(
        "RELAY_PUBLIC_URL", "--public-url", "", base_url, "public base URL, for the webhook URL",
        unset="http://HOST:PORT",
    )  # fmt: skip
    log_level: str = setting(
        "RELAY_LOG_LEVEL", "--log-level", "INFO", log_level, "DEBUG, INFO, WARNING or ERROR"
    )
    metrics_dir: Path | None = setting(
        "PROMETHEUS_MULTIPROC_DIR", "--metrics-dir", None, path, "where --workers processes write metrics",
        unset="RELAY_DATA_DIR/metrics with --workers",
    )  # fmt: skip

    # Past one database machine: a pooler, a replica for reads, a direct LISTEN connection
    listen_database_url: Secret | None = setting(
        "RELAY_LISTEN_DATABASE_URL", "--listen-database-url", None, secret,
        "DSN for the LISTEN connection (direct or a session pooler)", secret=True, unset="DATABASE_URL",
    )  # fmt: skip
    read_database_url: Secret | None = setting(
        "RELAY_READ_DATABASE_URL", "--read-database-url", None, secret,
        "DSN for reads that may lag (search, export, usage); may be a streaming replica",
        secret=True, unset="DATABASE_URL",
    )  # fmt: skip
    database_pooler: str = setting(
        "RELAY_DATABASE_POOLER", "--database-pooler", "off", pooler,
        "transaction when DATABASE_URL goes through PgBouncer in transaction mode",
    )  # fmt: skip

    # Webhook ingestion
    webhook_secrets: tuple[Secret, ...] = setting(
        "REPLICATE_WEBHOOK_SECRET", "--webhook-secret", (), webhook_secrets,
        "whsec_… secret(s), space-separated", secret=True, unset=DEV_SECRET,
    )  # fmt: skip
    webhook_tolerance: int = setting(
        "RELAY_WEBHOOK_TOLERANCE", "--webhook-tolerance", 300, whole(), "max webhook-timestamp skew, seconds"
    )
    max_body: int = setting("RELAY_MAX_BODY", "--max-body", 4 * MIB, whole(), "largest webhook body, bytes")

    # Access
    admin_token: Secret | None = setting(
        "RELAY_ADMIN_TOKEN", "--admin-token", None, secret, "bearer token for /admin/* and /events/ws",
        secret=True, unset=DEV_SECRET,
    )  # fmt: skip
    subscribe_key: Secret | None = setting(
        "RELAY_SUBSCRIBE_KEY", "--subscribe-key", None, secret, "HS256 key for subscriber tokens",
        secret=True, unset=DEV_SECRET,
    )  # fmt: skip
    api_keys: tuple[Secret, ...] = setting(
        "RELAY_API_KEYS", "--api-keys", (), secret_list, "API keys for /api/*, space-separated",
        secret=True, unset="admin token only",
    )  # fmt: skip
    allowed_origins: tuple[str, ...] = setting(
        "RELAY_ALLOWED_ORIGINS", "--allowed-origins", (), origins,
        "origins that may open streams, comma-separated", unset="same origin and RELAY_PUBLIC_URL",
    )  # fmt: skip
    cors_origins: tuple[str, ...] = setting(
        "RELAY_CORS_ORIGINS", "--cors-origins", (), origins, "origins that may call /api/*, comma-separated"
    )

    # Live fan-out
    ws_queue_size: int = setting(
        "RELAY_WS_QUEUE", "--ws-queue", 1000, whole(), "messages queued per subscriber before 1013"
    )
    ws_ping_interval: int = setting(
        "RELAY_WS_PING", "--ws-ping", 20, whole(), "WebSocket ping interval, seconds"
    )

    # Predictions API proxy and reconcile
    replicate_api_token: Secret | None = setting(
        "REPLICATE_API_TOKEN", "--replicate-api-token", None, secret, "token for the predictions API proxy",
        secret=True, unset="proxy disabled, 503", aliases=("REPLICATE_API_KEY",),
    )  # fmt: skip
    replicate_api_base: str = setting(
        "REPLICATE_API_BASE", "--replicate-api-base", "https://api.replicate.com/v1", base_url,
        "upstream API base URL",
    )  # fmt: skip
    upstream_timeout: int = setting(
        "RELAY_UPSTREAM_TIMEOUT", "--upstream-timeout", 30, whole(), "Replicate API timeout, seconds"
    )
    upstream_retries: int = setting(
        "RELAY_UPSTREAM_RETRIES", "--upstream-retries", 3, whole(minimum=0), "Replicate API retries"
    )
    api_max_body: int = setting(
        "RELAY_API_MAX_BODY", "--api-max-body", 1 * MIB, whole(), "largest /api/* request body, bytes"
    )
    api_rate_limit: int = setting(
        "RELAY_API_RATE_LIMIT", "--api-rate-limit", 100, whole(), "/api/* requests per key per hour"
    )
    reconcile_after: int = setting(
        "RELAY_RECONCILE_AFTER",
        "--reconcile-after",
        300,
        whole(),
        "seconds without an event before reconciling",
    )
    reconcile_interval: int = setting(
        "RELAY_RECONCILE_INTERVAL", "--reconcile-interval", 60, whole(), "reconcile period, seconds"
    )

    # Privacy
    encryption_keys: tuple[Secret, ...] = setting(
        "RELAY_ENCRYPTION_KEY", "--encryption-key", (), encryption_keys,
        "key-encryption key(s), space-separated, current first", secret=True, unset="off: stored in clear",
    )  # fmt: skip

    # Usage and cost
    prices: dict[str, float] = setting(
        "RELAY_PRICES", "--prices", {}, prices, "model=USD-per-second pairs, space-separated"
    )
    budget: float | None = setting("RELAY_BUDGET", "--budget", None, budget, "monthly budget, USD")
    budget_interval: int = setting(
        "RELAY_BUDGET_INTERVAL", "--budget-interval", 60, whole(), "budget check period, seconds"
    )

    # Destinations
    retry_schedule: tuple[float, ...] = setting(
        "RELAY_RETRY_SCHEDULE", "--retry-schedule", DEFAULT_SCHEDULE, schedule,
        "destinations' retry delays, seconds, comma-separated", unset=DEFAULT_SCHEDULE_TEXT,
    )  # fmt: skip
    destination_concurrency: int = setting(
        "RELAY_DESTINATION_CONCURRENCY", "--destination-concurrency", 16, whole(),
        "requests in flight per destination",
    )  # fmt: skip
    destinations: bool = setting(
        "RELAY_DESTINATIONS", "--destinations", True, on_off,
        "on: this server sends destinations; off: `relay destinations run` does", unset="on",
    )  # fmt: skip

    # Output archive
    archive: str = setting(
        "RELAY_ARCHIVE", "--archive", "", archive_store,
        "where output files are kept: file:///path, s3://bucket/prefix or off",
        unset="file://RELAY_DATA_DIR/files",
    )  # fmt: skip
    archive_hosts: tuple[str, ...] = setting(
        "RELAY_ARCHIVE_HOSTS", "--archive-hosts", DEFAULT_ARCHIVE_HOSTS, archive_hosts,
        "origins whose output URLs are downloaded, space-separated, *. wildcard",
        unset=" ".join(DEFAULT_ARCHIVE_HOSTS),
    )  # fmt: skip
    archive_max_bytes: int = setting(
        "RELAY_ARCHIVE_MAX_BYTES",
        "--archive-max-bytes",
        100 * MIB,
        whole(),
        "largest output file kept, bytes",
    )
    archive_concurrency: int = setting(
        "RELAY_ARCHIVE_CONCURRENCY",
        "--archive-concurrency",
        4,
        whole(),
        "archive downloads at once per process",
    )

    # Hardening: bounds a hostile client cannot push past, and replays to private addresses
    max_header_bytes: int = setting(
        "RELAY_MAX_HEADER_BYTES", "--max-header-bytes", 65536, whole(minimum=1024),
        "largest request head (request line + headers), bytes; larger: 431",
    )  # fmt: skip
    ws_queue_bytes: int = setting(
        "RELAY_WS_QUEUE_BYTES", "--ws-queue-bytes", 8 * MIB, whole(minimum=1024),
        "bytes queued per subscriber before 1013",
    )  # fmt: skip
    replay_private: bool = setting(
        "RELAY_REPLAY_PRIVATE", "--replay-private", False, on_off,
        "on: admin replays and destinations may target loopback, private and link-local addresses",
    )  # fmt: skip

    # API surface: the prediction cache and logs
    cache_ttl: int = setting(
        "RELAY_CACHE_TTL", "--cache-ttl", 86400, whole(),
        "seconds a succeeded prediction may answer an identical request",
    )  # fmt: skip
    log_format: str = setting(
        "RELAY_LOG_FORMAT", "--log-format", "text", log_format, "text, or json: one object a line"
    )
    access_log: bool = setting(
        "RELAY_ACCESS_LOG", "--access-log", True, on_off, "on or off: a line per HTTP request, no tokens",
        unset="on",
    )  # fmt: skip

    # Not settings: what load_settings found out.
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


def settings_table() -> dict[str, Setting]:
    """Every setting by its `Settings` attribute, in the table's order."""
    return {f.name: f.metadata["setting"] for f in dataclasses.fields(Settings) if "setting" in f.metadata}


SETTINGS = settings_table()

# Every variable `relay serve` reads, as a flag.
SERVE_FLAGS = tuple(serve_flag(row) for row in SETTINGS.values())


def _read(env: Mapping[str, str], row: Setting) -> object:
    """One setting's value: the first of its names that is set and parses to something, else the default."""
    for name in (row.variable, *row.aliases):
        raw = env.get(name, "")
        value = row.parse(raw, name) if raw else None
        if value is not None:
            return value
    return row.default


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
    values: dict[str, object] = {attr: _read(env, row) for attr, row in SETTINGS.items()}
    values["flags"] = flags
    values.update(_archive_defaults(env, values))  # Output archive
    database_url = values["database_url"]
    if database_url is None:  # dev mode: never mix generated secrets into a real deployment
        values.update(_dev_secrets(values, Path(str(values["data_dir"])), generate_missing))
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


def _stored_secrets(path: Path) -> dict[str, str]:
    """The dev secrets kept in RELAY_DATA_DIR, or one line saying why they cannot be read."""
    try:
        stored = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as error:
        stored = error
    if not isinstance(stored, dict) or not all(isinstance(v, str) for v in stored.values()):
        raise ConfigError(
            f"{path} cannot be read as Relay's dev secrets; restore it, or move it away and "
            "Relay generates new ones (give the new webhook secret to Replicate)"
        )
    return stored


def _store_secrets(path: Path, stored: dict[str, str]) -> None:
    """Written whole (a temporary file renamed over the old one), readable by this user only."""
    partial = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.unlink(missing_ok=True)
        partial.touch(mode=0o600)
        partial.write_text(json.dumps(stored, indent=2))
        partial.replace(path)
    except OSError as error:
        raise ConfigError(
            f"cannot write the dev secrets to {path} ({error.strerror}); "
            "point RELAY_DATA_DIR at a writable directory"
        ) from None


def _dev_secrets(values: dict[str, object], data_dir: Path, generate: bool) -> dict[str, object]:
    """Missing secrets from `data_dir/secrets.json`, generated and stored there when allowed."""
    path = data_dir / GENERATED_SECRETS_FILE
    missing = [attr for attr in _REQUIRED if not values[attr]]
    if not missing:
        return {}
    stored = _stored_secrets(path)
    fresh = [attr for attr in missing if attr not in stored]
    if fresh and generate:
        for attr in fresh:
            stored[attr] = _new_secret(attr)
        _store_secrets(path, stored)
    found: dict[str, object] = {attr: Secret(stored[attr]) for attr in missing if attr in stored}
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
        # Output archive: the dev defaults the parent resolved (workers see a DATABASE_URL)
        "RELAY_ARCHIVE": settings.archive,
        "RELAY_ARCHIVE_HOSTS": " ".join(settings.archive_hosts),
    }
