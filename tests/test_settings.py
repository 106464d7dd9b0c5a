"""`relay serve` flags: one for every configuration variable, and a flag wins over the environment."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from service.cli.main import build_parser
from service.core.errors import ConfigError
from service.core.hosts import DEFAULT_ARCHIVE_HOSTS
from service.core.settings import SERVE_FLAGS, SETTINGS, Settings, load_settings, worker_environment

from .support import relay_env

# The variables of DESIGN.md's "Configuration" table, each of which must also be a serve flag.
DESIGN_VARIABLES = {
    "RELAY_HOST": "--host",
    "RELAY_PORT": "--port",
    "DATABASE_URL": "--database-url",
    "RELAY_DATA_DIR": "--data-dir",
    "REPLICATE_WEBHOOK_SECRET": "--webhook-secret",
    "RELAY_WEBHOOK_TOLERANCE": "--webhook-tolerance",
    "RELAY_MAX_BODY": "--max-body",
    "RELAY_ADMIN_TOKEN": "--admin-token",
    "RELAY_SUBSCRIBE_KEY": "--subscribe-key",
    "REPLICATE_API_TOKEN": "--replicate-api-token",
    "REPLICATE_API_BASE": "--replicate-api-base",
    "RELAY_PUBLIC_URL": "--public-url",
    "RELAY_ENCRYPTION_KEY": "--encryption-key",
    "RELAY_RETRY_SCHEDULE": "--retry-schedule",
    "RELAY_ARCHIVE": "--archive",
    "RELAY_ARCHIVE_HOSTS": "--archive-hosts",
    "RELAY_ARCHIVE_MAX_BYTES": "--archive-max-bytes",
}
# A valid value, different from the suite's environment and the default, for every flag.
SAMPLES = {
    "RELAY_HOST": "0.0.0.0",
    "RELAY_PORT": "9123",
    "RELAY_WORKERS": "3",
    "DATABASE_URL": "postgresql://other@db.example/relay",
    "RELAY_DATA_DIR": "/var/lib/relay-flag",
    "REPLICATE_WEBHOOK_SECRET": "whsec_ZmxhZy1zZWNyZXQ=",
    "RELAY_WEBHOOK_TOLERANCE": "60",
    "RELAY_MAX_BODY": "1000",
    "RELAY_ADMIN_TOKEN": "flag-admin-token",
    "RELAY_SUBSCRIBE_KEY": "flag-subscribe-key",
    "RELAY_API_KEYS": "key-one key-two",
    "REPLICATE_API_TOKEN": "r8_flag",
    "REPLICATE_API_BASE": "http://127.0.0.1:9/v1",
    "RELAY_PUBLIC_URL": "https://relay.example.com",
    "RELAY_ENCRYPTION_KEY": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    "RELAY_LOG_LEVEL": "DEBUG",
    "RELAY_WS_QUEUE": "5",
    "RELAY_WS_PING": "7",
    "RELAY_MAX_HEADER_BYTES": "8192",
    "RELAY_WS_QUEUE_BYTES": "2048",
    "RELAY_REPLAY_PRIVATE": "off",  # relay_env turns it on for the test receivers
    "RELAY_PRICES": "a/b=0.5",
    "RELAY_BUDGET": "20",
    "RELAY_BUDGET_INTERVAL": "9",
    "PROMETHEUS_MULTIPROC_DIR": "/tmp/relay-flag-metrics",
    "RELAY_UPSTREAM_TIMEOUT": "4",
    "RELAY_UPSTREAM_RETRIES": "0",
    "RELAY_API_MAX_BODY": "99",
    "RELAY_API_RATE_LIMIT": "8",
    "RELAY_RECONCILE_AFTER": "11",
    "RELAY_RECONCILE_INTERVAL": "12",
    "RELAY_ALLOWED_ORIGINS": "https://app.example.com",
    "RELAY_CORS_ORIGINS": "*",
    "RELAY_ARCHIVE": "s3://relay-files/outputs",
    "RELAY_ARCHIVE_HOSTS": "https://files.example.com https://*.cdn.example.com",
    "RELAY_ARCHIVE_MAX_BYTES": "1000",
    "RELAY_ARCHIVE_CONCURRENCY": "2",
    "RELAY_LISTEN_DATABASE_URL": "postgresql://direct@db.example/relay",
    "RELAY_READ_DATABASE_URL": "postgresql://replica@db.example/relay",
    "RELAY_DATABASE_POOLER": "transaction",
    # Destinations
    "RELAY_RETRY_SCHEDULE": "0,1,2",
    "RELAY_DESTINATION_CONCURRENCY": "4",
    "RELAY_DESTINATIONS": "off",
    "RELAY_CACHE_TTL": "60",
    "RELAY_LOG_FORMAT": "json",
    "RELAY_ACCESS_LOG": "off",
}
FLAGS = {flag.variable: flag.name for flag in SERVE_FLAGS}


def test_every_variable_of_the_design_table_is_a_serve_flag():
    assert {name: FLAGS.get(name) for name in DESIGN_VARIABLES} == DESIGN_VARIABLES


def without_flags(settings: Settings) -> Settings:
    return dataclasses.replace(settings, flags={})


@pytest.mark.parametrize("flag", SERVE_FLAGS, ids=lambda flag: flag.name)
def test_each_flag_sets_its_variable_over_the_environment(flag):
    env = relay_env("postgresql://suite@db.example/relay")
    args = build_parser().parse_args(["serve", flag.name, SAMPLES[flag.variable]])
    value = getattr(args, flag.variable)
    from_flag = load_settings(env, overrides={flag.variable: str(value)})
    from_env = load_settings({**env, flag.variable: SAMPLES[flag.variable]})
    assert without_flags(from_flag) == from_env != load_settings(env)


def test_flags_reach_the_workers_of_relay_serve_workers():
    """`--workers N` workers load their settings from the environment the parent gives them."""
    env = relay_env("postgresql://suite@db.example/relay")
    parent = load_settings(env, overrides={"RELAY_MAX_BODY": "1000", "RELAY_WORKERS": "2"})
    workers_env = worker_environment(parent, str(parent.database_url), parent.data_dir / "metrics")
    assert load_settings({**env, **workers_env}).max_body == 1000


def test_archive_settings_default_to_the_data_dir_and_replicate_delivery(tmp_path):
    """The archive is on by default in RELAY_DATA_DIR/files; a dev instance also allows the origin
    of `relay simulate --serve-outputs` (its port + 1), a deployment does not."""
    dev = load_settings({"RELAY_DATA_DIR": str(tmp_path), "RELAY_PORT": "8100"}, generate_missing=False)
    assert dev.archive == (tmp_path / "files").as_uri()
    assert dev.archive_hosts == (
        "https://replicate.delivery",
        "https://*.replicate.delivery",
        "http://127.0.0.1:8101",
    )
    deployed = load_settings({**relay_env("postgresql://suite@db.example/relay"), "RELAY_ARCHIVE": ""})
    assert deployed.archive_hosts == ("https://replicate.delivery", "https://*.replicate.delivery")
    assert deployed.archive_max_bytes == 104857600


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("RELAY_ARCHIVE", "/var/files", "file:///absolute/path, s3://bucket[/prefix] or off"),
        ("RELAY_ARCHIVE", "s3://", "file:///absolute/path"),
        ("RELAY_ARCHIVE_HOSTS", "replicate.delivery", "is not an origin"),
        ("RELAY_ARCHIVE_HOSTS", "https://example.com/path", "is not an origin"),
        ("RELAY_ARCHIVE_HOSTS", "http://*.example.com", "wildcard is for https origins only"),
        ("RELAY_ARCHIVE_MAX_BYTES", "0", "at least 1"),
    ],
)
def test_malformed_archive_settings_are_one_clear_line(variable, value, message):
    env = {**relay_env("postgresql://suite@db.example/relay"), variable: value}
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(env)


# Defaults that DESIGN.md's "Configuration" table states, as the configuration page shows them.
DESIGN_DEFAULTS = {
    "RELAY_HOST": "127.0.0.1",
    "RELAY_PORT": "8000",
    "RELAY_DATA_DIR": "./.relay",
    "RELAY_WEBHOOK_TOLERANCE": "300",
    "RELAY_MAX_BODY": "4194304",
    "REPLICATE_API_BASE": "https://api.replicate.com/v1",
    "RELAY_LISTEN_DATABASE_URL": "DATABASE_URL",
    "RELAY_READ_DATABASE_URL": "DATABASE_URL",
    "RELAY_DATABASE_POOLER": "off",
    "RELAY_ARCHIVE": "file://RELAY_DATA_DIR/files",
    "RELAY_ARCHIVE_HOSTS": "https://replicate.delivery https://*.replicate.delivery",
    "RELAY_ARCHIVE_MAX_BYTES": "104857600",
}


def test_the_settings_table_shows_the_design_defaults():
    shown = {row.variable: row.default_text for row in SETTINGS.values()}
    assert {name: shown[name] for name in DESIGN_DEFAULTS} == DESIGN_DEFAULTS


def test_an_empty_environment_loads_the_defaults_of_the_settings_table(tmp_path):
    """load_settings and Settings() take each default from the one table, so they agree."""
    loaded = load_settings({"RELAY_DATA_DIR": str(tmp_path)}, generate_missing=False)
    # The archive's defaults depend on other settings: RELAY_DATA_DIR, and dev mode (see below).
    derived = {"archive": "", "archive_hosts": DEFAULT_ARCHIVE_HOSTS}
    assert dataclasses.replace(loaded, data_dir=Path(".relay"), **derived) == Settings()
    assert loaded.data_dir == tmp_path
    assert {flag.variable for flag in SERVE_FLAGS} == {row.variable for row in SETTINGS.values()}
