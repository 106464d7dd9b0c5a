"""The wheel is complete: installed on its own (not editable), Relay migrates, serves and ingests.

The slow packaging test (marker `packaging`, still in the normal run): it builds the wheel from
a copy of the sources, installs it with `--no-deps` into a fresh virtualenv that borrows the
dependencies of the running one (a `.pth` line: no download, no index), and runs the console
script from a directory outside the checkout, so nothing can come from the source tree.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .support import ROOT, Postgres, RelayProcess, admin_headers, new_prediction_id, post_webhook, relay_env

pytestmark = pytest.mark.packaging


@dataclass
class Installed:
    venv: Path
    package: Path  # the installed service/ directory
    home: Path  # a working directory outside the checkout

    @property
    def relay(self) -> str:
        return str(self.venv / "bin" / "relay")

    def run(self, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.relay, *args], env=env, cwd=self.home, capture_output=True, text=True, timeout=120
        )


def build_wheel(tmp: Path) -> Path:
    source = tmp / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("service", "sql"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("relay-*.whl")
    return wheel


def install(wheel: Path, tmp: Path) -> Installed:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    where = [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    purelib = Path(subprocess.check_output(where, text=True).strip()).resolve()
    # The dependencies: a plain path line, so the running venv's own .pth files (its editable
    # install of this checkout among them) are not processed in the new one.
    borrowed = [sysconfig.get_path("purelib"), *site.getsitepackages()]
    (purelib / "_relay_test_dependencies.pth").write_text("\n".join(dict.fromkeys(borrowed)) + "\n")
    home = tmp / "home"
    home.mkdir()
    return Installed(venv=venv, package=purelib / "service", home=home)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tmp = tmp_path_factory.mktemp("wheel")
    yield install(build_wheel(tmp), tmp)


def test_the_installed_wheel_migrates_serves_and_ingests_a_signed_webhook(installed, postgres: Postgres):
    """`relay migrate` applies every migration of sql/ from the wheel; `relay serve` answers
    ready, stores a signed delivery and serves the dashboard, all from the installed files."""
    where = subprocess.run(
        [installed.venv / "bin" / "python", "-c", "import service; print(service.__file__)"],
        cwd=installed.home, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()).resolve().is_relative_to(installed.package.resolve())
    env = relay_env(postgres.new_database(migrate=False))
    migrated = installed.run("migrate", env=env)
    expected = sorted(p.stem for p in (ROOT / "sql").glob("[0-9][0-9][0-9]_*.sql"))
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.strip() == f"applied {len(expected)} migration(s): {', '.join(expected)}"
    with (
        RelayProcess(env, program=(installed.relay,), cwd=installed.home) as relay,
        httpx.Client(base_url=relay.url, timeout=30) as client,
    ):
        prediction_id = new_prediction_id()
        stored = post_webhook(client, {"id": prediction_id, "status": "starting"})
        assert stored.status_code == 200 and stored.json()["duplicate"] is False, stored.text
        state = client.get(f"/predictions/{prediction_id}", headers=admin_headers())
        assert state.json()["status"] == "starting"
        page = client.get("/")
        assert page.status_code == 200 and "relay" in page.text.lower()
        assert client.get("/static/dashboard.js").status_code == 200


def test_without_its_migrations_relay_refuses_to_start_and_is_not_ready(installed, postgres: Postgres):
    """A wheel that lost its migrations: a running Relay reports 503 on /readyz, and `relay
    migrate` and `relay serve` exit 2 with one line instead of starting on an empty schema."""
    env = relay_env(postgres.new_database())
    sql = installed.package / "sql"
    saved = installed.home / "saved-sql"
    with RelayProcess(env, program=(installed.relay,), cwd=installed.home) as relay:
        shutil.copytree(sql, saved)
        for migration in sql.glob("*.sql"):
            migration.unlink()
        try:
            ready = httpx.get(relay.url + "/readyz", timeout=10)
            assert ready.status_code == 503
            assert "no migrations found" in ready.json()["reason"]
            for command in (("migrate",), ("serve", "--port", "1")):
                refused = installed.run(*command, env=env)
                assert refused.returncode == 2, (command, refused.stdout, refused.stderr)
                lines = refused.stderr.strip().splitlines()
                assert len(lines) == 1 and "no migrations found" in lines[0], (command, refused.stderr)
        finally:
            for migration in saved.glob("*.sql"):
                shutil.copy(migration, sql / migration.name)
