"""Output archive through `relay serve`: /files auth, kill -9 mid-download, two instances."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from service.core.auth import mint_token
from service.db import store
from service.db.vault import Vault

from .fake_replicate import FakeReplicate, api_client, relay_for
from .fileserver import DRIP, FileServer, png
from .s3 import RefusingS3
from .support import (
    ADMIN_TOKEN,
    ROOT,
    SUBSCRIBE_KEY,
    Postgres,
    RelayProcess,
    admin_headers,
    free_port,
    new_prediction_id,
    post_webhook,
    query,
    relay_env,
)


def archive_env(dsn: str, store: Path, origin: str, **extra: str) -> dict[str, str]:
    places = {"RELAY_ARCHIVE": store.as_uri(), "RELAY_DATA_DIR": str(store.parent)}
    return relay_env(dsn, RELAY_ARCHIVE_HOSTS=origin, **places, **extra)


def succeeded(prediction_id: str, output: Any) -> dict[str, Any]:
    return {"id": prediction_id, "status": "succeeded", "output": output}


def wait_for(check: Any, timeout: float = 30, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {message}")


def stored_objects(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file())


def test_files_are_served_to_the_admin_and_the_right_subscriber_only(
    postgres: Postgres, files: FileServer, tmp_path: Path
) -> None:
    """/files/<sha256>: 401 without a token, 403 for another prediction's token, 200 with type,
    length, ETag and an immutable cache header for the admin and the prediction's subscriber."""
    body = png(11, 80)
    url = files.add("/out/11.png", body)
    prediction, other = new_prediction_id(), new_prediction_id()
    env = archive_env(postgres.new_database(), tmp_path / "files", files.origin)
    with RelayProcess(env) as relay, httpx.Client(base_url=relay.url, timeout=10) as client:
        assert post_webhook(client, succeeded(prediction, [url])).status_code == 200
        assert post_webhook(client, succeeded(other, [])).status_code == 200

        def archived() -> dict[str, Any] | None:
            state = client.get(f"/predictions/{prediction}", headers=admin_headers()).json()
            return state["archive"][0] if state["archive"][0]["status"] == "stored" else None

        item = wait_for(archived, message="the output to be stored")
        sha = hashlib.sha256(body).hexdigest()
        assert item == {"url": url, "status": "stored", "file": f"/files/{sha}", "sha256": sha,
                        "size": len(body), "content_type": "image/png"}  # fmt: skip
        path = item["file"]
        assert client.get(path).status_code == 401
        wrong = client.get(path, params={"token": mint_token(SUBSCRIBE_KEY, other)})
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "FORBIDDEN"
        for token in (ADMIN_TOKEN, mint_token(SUBSCRIBE_KEY, prediction)):
            answer = client.get(path, headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200 and answer.content == body
            assert answer.headers["content-type"] == "image/png"
            assert answer.headers["content-length"] == str(len(body))
            assert answer.headers["etag"] == f'"{sha}"'
            assert "immutable" in answer.headers["cache-control"]
            assert answer.headers["x-content-type-options"] == "nosniff"
        for validator in (f'"{sha}"', f'W/"{sha}"', f'"other", "{sha}"', "*"):  # RFC 9110 13.1.2
            again = client.get(path, params={"token": ADMIN_TOKEN}, headers={"If-None-Match": validator})
            assert again.status_code == 304, validator
        assert (
            client.get(path, params={"token": ADMIN_TOKEN}, headers={"If-None-Match": '"other"'}).content
            == body
        )
        part = client.get(path, params={"token": ADMIN_TOKEN}, headers={"Range": "bytes=8-23"})
        assert part.status_code == 206 and part.content == body[8:24]
        assert part.headers["content-range"] == f"bytes 8-23/{len(body)}"
        beyond = client.get(path, params={"token": ADMIN_TOKEN}, headers={"Range": f"bytes={len(body)}-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(body)}"
        assert beyond.json()["error"]["code"] == "RANGE_NOT_SATISFIABLE"  # the error shape, not cached
        assert "immutable" not in beyond.headers.get("cache-control", "")
        assert client.get("/files/" + "0" * 64, params={"token": ADMIN_TOKEN}).status_code == 404
        assert (
            client.get(
                "/files/" + "0" * 64, params={"token": mint_token(SUBSCRIBE_KEY, prediction)}
            ).status_code
            == 403
        )
        metrics = client.get("/metrics").text
        assert "relay_archive_files_total 1.0" in metrics and "relay_archive_bytes_total" in metrics
        for lost in stored_objects(tmp_path / "files"):  # a store not shared by every instance
            lost.unlink()
        missing = client.get(path, params={"token": ADMIN_TOKEN})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
    assert files.counts()["/out/11.png"] == 1


STORED_ROW = """
INSERT INTO archive_jobs (url_hash, prediction_id, seq, url, encrypted, give_up_at, status, sha256, size,
                          content_type, object_key)
VALUES ($1, $2, 1, $3, false, now(), 'stored', $4, 100, 'image/png', $5)
"""


def test_a_store_that_refuses_a_read_answers_503_not_a_500(postgres: Postgres, tmp_path: Path) -> None:
    """An S3 store refusing to read a stored file (403) is a 503 STORE_UNAVAILABLE in the error
    shape with Retry-After, logged in one line without the store's URL: never a 500 and a traceback."""
    sha = hashlib.sha256(b"refused").hexdigest()
    with RefusingS3() as s3:
        dsn = postgres.new_database()
        url = "https://replicate.delivery/x/out.png"
        query(dsn, STORED_ROW, hashlib.sha256(url.encode()).digest(), new_prediction_id(), url.encode(), sha,
              f"{sha[:2]}/{sha}")  # fmt: skip
        env = relay_env(dsn, RELAY_ARCHIVE="s3://relay-test/outputs", RELAY_DATA_DIR=str(tmp_path), **s3.env)
        with RelayProcess(env) as relay:
            answer = httpx.get(f"{relay.url}/files/{sha}", params={"token": ADMIN_TOKEN}, timeout=30)
            head = httpx.head(f"{relay.url}/files/{sha}", params={"token": ADMIN_TOKEN}, timeout=30)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "STORE_UNAVAILABLE"
    assert answer.headers["retry-after"] and head.status_code == 503
    logged = relay.read_output()
    assert "Traceback" not in logged and s3.endpoint not in logged
    assert "the archive store cannot be read" in logged


def test_a_head_asks_the_store_whether_the_file_is_there_and_never_reads_it(
    postgres: Postgres, tmp_path: Path
) -> None:
    """HEAD /files/… answers a GET's headers (Content-Length, type, ETag, 206 for a range) from a
    HEAD of the object: the bytes are never read (a HEAD of a video must not download it)."""
    sha = hashlib.sha256(b"head").hexdigest()
    with RefusingS3(head_size=100) as s3:  # reads are refused: a GET of the object would fail
        dsn = postgres.new_database()
        url = "https://replicate.delivery/x/head.png"
        query(dsn, STORED_ROW, hashlib.sha256(url.encode()).digest(), new_prediction_id(), url.encode(), sha,
              f"{sha[:2]}/{sha}")  # fmt: skip
        env = relay_env(dsn, RELAY_ARCHIVE="s3://relay-test/outputs", RELAY_DATA_DIR=str(tmp_path), **s3.env)
        with RelayProcess(env) as relay, httpx.Client(base_url=relay.url, timeout=30) as client:
            whole = client.head(f"/files/{sha}", params={"token": ADMIN_TOKEN})
            part = client.head(
                f"/files/{sha}", params={"token": ADMIN_TOKEN}, headers={"Range": "bytes=10-19"}
            )
    assert whole.status_code == 200 and whole.headers["content-length"] == "100"
    assert whole.headers["content-type"] == "image/png" and whole.headers["etag"] == f'"{sha}"'
    assert part.status_code == 206 and part.headers["content-range"] == "bytes 10-19/100"
    assert part.headers["content-length"] == "10"
    assert "GET" not in s3.methods and "HEAD" in s3.methods


def test_kill_9_mid_download_resumes_after_restart_with_one_object(
    postgres: Postgres, files: FileServer, tmp_path: Path
) -> None:
    """A process killed while downloading leaves no object; the restarted one stores exactly one."""
    body = png(12, 40)
    url = files.add("/slow.png", body)
    files.script["/slow.png"] = [DRIP]
    store = tmp_path / "files"
    env = archive_env(postgres.new_database(), store, files.origin)
    relay = RelayProcess(env).start()
    try:
        with httpx.Client(base_url=relay.url, timeout=10) as client:
            assert post_webhook(client, succeeded(new_prediction_id(), [url])).status_code == 200
        assert files.drip_started.wait(20), "the download never started"
        time.sleep(0.5)  # some bytes are in the spool file now
        relay.stop(signal.SIGKILL)
    finally:
        relay.stop()
    assert stored_objects(store) == []
    assert list((tmp_path / "archive-spool").glob("*.part")), "a partial download was left behind"
    with RelayProcess(env, port=relay.port):
        wait_for(lambda: query(env["DATABASE_URL"], "SELECT 1 FROM archive_jobs WHERE status = 'stored'"),
                 message="the job to be stored after the restart")  # fmt: skip
    [only] = stored_objects(store)
    assert only.read_bytes() == body and only.name == hashlib.sha256(body).hexdigest()
    assert list((tmp_path / "archive-spool").glob("*.part")) == []
    assert files.counts()["/slow.png"] == 2


def test_two_instances_share_200_files_and_fetch_each_once(
    postgres: Postgres, files: FileServer, tmp_path: Path
) -> None:
    """Two `relay serve` on one database and store: every file is fetched once and stored once."""
    files.delay = 0.05  # long enough that both instances claim work (each polls every second)
    urls = [files.add(f"/many/{n}.png", png(1000 + n, 24)) for n in range(200)]
    store = tmp_path / "files"
    dsn = postgres.new_database()
    env = archive_env(dsn, store, files.origin)
    with RelayProcess(env) as first, RelayProcess(env) as second:
        with httpx.Client(base_url=first.url, timeout=10) as client:
            for start in range(0, 200, 10):
                output = {"images": urls[start : start + 10]}
                assert post_webhook(client, succeeded(new_prediction_id(), output)).status_code == 200
        stored = "SELECT count(*) AS n FROM archive_jobs WHERE status = 'stored'"
        wait_for(lambda: query(dsn, stored)[0]["n"] == 200, timeout=90, message="200 stored files")
        per_instance = [
            float(line.split()[-1])
            for relay in (first, second)
            for line in httpx.get(relay.url + "/metrics").text.splitlines()
            if line.startswith("relay_archive_files_total ")
        ]
    counts = files.counts()
    assert len(counts) == 200 and set(counts.values()) == {1}, "a file was fetched twice"
    assert len(stored_objects(store)) == 200
    assert sum(per_instance) == 200 and all(per_instance), f"one instance did all the work: {per_instance}"


def relay_command(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_archive_status_lists_failures_and_retry_fetches_again(
    postgres: Postgres, files: FileServer, tmp_path: Path
) -> None:
    """`relay archive status --failed` names the reason; `relay archive retry` re-queues the job."""
    prediction = new_prediction_id()
    url = files.origin + "/late.png"
    env = archive_env(postgres.new_database(), tmp_path / "files", files.origin)
    stored = "SELECT status FROM archive_jobs"
    with RelayProcess(env) as relay, httpx.Client(base_url=relay.url, timeout=10) as client:
        assert post_webhook(client, succeeded(prediction, [url])).status_code == 200
        wait_for(
            lambda: query(env["DATABASE_URL"], stored) == [("failed",)] or None, message="the 404 to fail"
        )
        status = relay_command("archive", "status", "--failed", env=env)
        assert status.returncode == 0, status.stderr
        assert (
            "0 pending, 0 stored, 1 failed" in status.stdout
            and "failed: HTTP 404: the file is gone" in status.stdout
        )
        assert "/late.png" not in status.stdout  # an output URL is content: only its origin is shown
        files.add("/late.png", png(21))
        again = relay_command("archive", "retry", prediction, env=env)
        assert again.returncode == 0 and "re-queued 1" in again.stdout, again.stderr
        wait_for(
            lambda: query(env["DATABASE_URL"], stored) == [("stored",)] or None, message="the retry to store"
        )
        mine = relay_command("archive", "status", "--prediction", prediction, env=env)
        assert "1 stored" in mine.stdout and "image/png" in mine.stdout
    missing = relay_command("archive", "retry", "nothing-here", env=env)
    assert missing.returncode == 2 and "no failed archive job" in missing.stderr


def test_archive_retry_of_an_empty_or_wildcard_id_re_queues_nothing(
    postgres: Postgres, tmp_path: Path
) -> None:
    """`relay archive retry` matches a prediction id or a job id's hex prefix only: "" or "%" (an
    unset shell variable, a LIKE wildcard) is an error line and exit 2, not every failed job again."""
    dsn = postgres.new_database()
    for n in range(2):
        url = f"https://replicate.delivery/x/{n}.png"
        query(dsn, STORED_ROW.replace("'stored'", "'failed'"), hashlib.sha256(url.encode()).digest(),
              new_prediction_id(), url.encode(), None, None)  # fmt: skip
    env = relay_env(dsn, RELAY_DATA_DIR=str(tmp_path))
    for target in ("", "%", "_%"):
        again = relay_command("archive", "retry", target, env=env)
        assert again.returncode == 2 and "no failed archive job" in again.stderr, (target, again.stdout)
        assert len(again.stderr.strip().splitlines()) == 1
    assert [row["status"] for row in query(dsn, "SELECT status FROM archive_jobs")] == ["failed", "failed"]
    [job] = query(dsn, "SELECT encode(url_hash, 'hex') AS id FROM archive_jobs LIMIT 1")
    again = relay_command("archive", "retry", job["id"][:16], env=env)
    assert again.returncode == 0 and "re-queued 1 failed" in again.stdout, again.stderr


def test_relay_forget_deletes_the_archived_files(
    postgres: Postgres, files: FileServer, tmp_path: Path
) -> None:
    """With encryption on, `relay forget` removes the prediction's stored files from the store."""
    key = base64.b64encode(os.urandom(32)).decode()
    prediction = new_prediction_id()
    url = files.add("/mine.png", png(22, 64))
    store = tmp_path / "files"
    env = archive_env(postgres.new_database(), store, files.origin, RELAY_ENCRYPTION_KEY=key)
    with RelayProcess(env) as relay, httpx.Client(base_url=relay.url, timeout=10) as client:
        assert post_webhook(client, succeeded(prediction, [url])).status_code == 200
        wait_for(lambda: stored_objects(store), message="the file to be stored")
    [sealed] = stored_objects(store)
    assert png(22, 64) not in sealed.read_bytes()
    forget = relay_command("forget", prediction, env=env)
    assert forget.returncode == 0, forget.stderr
    assert "deleted 1 archived file(s)" in forget.stdout
    assert stored_objects(store) == []
    assert query(env["DATABASE_URL"], "SELECT count(*) FROM archive_jobs")[0][0] == 0


def test_relay_forget_with_the_store_refusing_says_so_in_one_line(postgres: Postgres, tmp_path: Path) -> None:
    """`relay forget` while S3 refuses to delete: the prediction is forgotten, the files' deletion
    is left to the erasure event (its job kept for it), reported in one line: no traceback."""
    key = os.urandom(32)
    dsn, prediction = postgres.new_database(), new_prediction_id()
    url = "https://replicate.delivery/x/mine.png"
    sha = hashlib.sha256(b"mine").hexdigest()

    async def seed() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            body = json.dumps({"id": prediction, "status": "succeeded", "output": [url]}).encode()
            delivery = store.Delivery(webhook_id=f"msg_{prediction}", prediction_id=prediction,
                                      status="succeeded", source="webhook", body=body,
                                      received_at=datetime.now(UTC))  # fmt: skip
            await store.append(conn, [delivery], Vault([key]).prepare)
            await conn.execute(STORED_ROW.replace("false", "true"), hashlib.sha256(url.encode()).digest(),
                               prediction, b"sealed", sha, f"{sha[:2]}/{sha}.0123456789abcdef")  # fmt: skip
        finally:
            await conn.close()

    asyncio.run(seed())
    with RefusingS3() as s3:
        env = relay_env(dsn, RELAY_ARCHIVE="s3://relay-test/outputs", RELAY_DATA_DIR=str(tmp_path),
                        RELAY_ENCRYPTION_KEY=base64.b64encode(key).decode(), **s3.env)  # fmt: skip
        forget = relay_command("forget", prediction, env=env)
    assert f"{prediction}: forgotten" in forget.stdout, forget.stderr
    assert forget.returncode == 2 and "Traceback" not in forget.stderr and s3.endpoint not in forget.stderr
    assert len(forget.stderr.strip().splitlines()) == 1 and "archived files" in forget.stderr
    assert query(dsn, "SELECT count(*) FROM archive_jobs")[0][0] == 1  # for the erasure event to delete


def test_relay_simulate_serve_outputs_is_archived(postgres: Postgres, tmp_path: Path) -> None:
    """`relay simulate --serve-outputs` serves real PNGs that an instance allowing its origin archives."""
    port = free_port()
    store = tmp_path / "files"
    env = archive_env(postgres.new_database(), store, f"http://127.0.0.1:{port}")
    with RelayProcess(env) as relay:
        options = ["--predictions", "3", "--serve-outputs", "--outputs-port", str(port), "--seed", "3"]
        ran = relay_command("simulate", "--url", relay.url + "/webhooks/replicate", *options, env=env)
        assert ran.returncode == 0, ran.stderr
        assert f"served 3 of 3 output files from http://127.0.0.1:{port}" in ran.stdout
        stored = "SELECT content_type FROM archive_jobs WHERE status = 'stored'"
        rows = wait_for(
            lambda: len(query(env["DATABASE_URL"], stored)) == 3 and query(env["DATABASE_URL"], stored)
        )
    assert [row["content_type"] for row in rows] == ["image/png"] * 3
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in stored_objects(store))


def test_api_get_carries_the_archive_of_replicates_output(
    postgres: Postgres, files: FileServer, tmp_path: Path
) -> None:
    """GET /api/predictions/{id} lists each allowed output URL of Replicate's answer with its copy."""
    body = png(31, 48)
    url = files.add("/api/out.png", body)
    places = {"RELAY_ARCHIVE": (tmp_path / "files").as_uri(), "RELAY_DATA_DIR": str(tmp_path)}
    dsn = postgres.new_database()
    with (
        FakeReplicate() as fake,
        relay_for(dsn, fake, RELAY_ARCHIVE_HOSTS=files.origin, **places) as relay,
        api_client(relay) as api,
    ):
        created = api.post("/api/predictions", json={"model": "owner/model", "input": {"prompt": "x"}}).json()
        prediction = created["id"]
        wait_for(lambda: fake.predictions[prediction]["status"] == "succeeded", message="the fake to finish")
        fake.predictions[prediction] = {
            **fake.predictions[prediction],
            "output": [url, "https://elsewhere.test/x"],
        }
        assert post_webhook(api, succeeded(prediction, [url])).status_code == 200

        def archived() -> list[dict[str, Any]] | None:
            archive = api.get(f"/api/predictions/{prediction}").json()["archive"]
            return archive if archive and archive[0]["status"] == "stored" else None

        [item] = wait_for(archived, message="the API to show the stored copy")
    assert item["file"] == f"/files/{hashlib.sha256(body).hexdigest()}" and item["url"] == url
