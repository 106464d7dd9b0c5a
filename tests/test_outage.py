"""A database that goes away (503 with Retry-After, never a hang or a 500, then service resumes),
and a schema that is behind (/readyz 503)."""

from __future__ import annotations

import time

import httpx

from service.db.migrations import migration_files
from service.ops.simulate import lifecycle

from .support import RelayProcess, admin_headers, new_prediction_id, post_webhook, query, relay_env

LAST = migration_files()[-1].stem


def test_database_down_gives_503_then_service_resumes(own_postgres):
    postgres = own_postgres
    with (
        RelayProcess(relay_env(postgres.new_database())) as relay,
        httpx.Client(base_url=relay.url, timeout=30) as http,
    ):
        before = lifecycle(new_prediction_id())[0]
        assert post_webhook(http, before).status_code == 200

        postgres.stop_server()
        during = lifecycle(new_prediction_id())[0]
        with httpx.Client(base_url=relay.url, timeout=15) as impatient:  # a hang raises here
            response = post_webhook(impatient, during)
        assert response.status_code == 503
        assert response.headers["retry-after"].isdigit()
        assert response.json()["error"]["code"] == "DATABASE_UNAVAILABLE"
        assert http.get("/readyz").status_code == 503
        assert http.get("/healthz").status_code == 200

        postgres.start_server()
        deadline = time.monotonic() + 20
        while http.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        after = post_webhook(http, during)  # Replicate's retry of the refused delivery
        assert after.status_code == 200 and after.json()["duplicate"] is False
        for prediction in (before, during):
            state = http.get(f"/predictions/{prediction['id']}", headers=admin_headers())
            assert state.status_code == 200 and state.json()["event_count"] == 1


def test_readyz_is_503_while_a_migration_is_pending(relay, client):
    """A schema behind the code (a migration not recorded as applied) is not ready, with the
    migration named and the fix; once it is applied again the instance is ready."""
    dsn = relay.env["DATABASE_URL"]
    assert client.get("/readyz").json() == {"status": "ok"}
    applied_at = query(dsn, "DELETE FROM schema_migrations WHERE version = $1 RETURNING applied_at", LAST)
    try:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {
            "status": "unavailable",
            "reason": f"migrations not applied: {LAST}; run relay migrate",
        }
        assert client.get("/healthz").status_code == 200
    finally:
        query(dsn, "INSERT INTO schema_migrations VALUES ($1, $2)", LAST, applied_at[0][0])
    assert client.get("/readyz").status_code == 200
