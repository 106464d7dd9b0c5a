"""Output archive, in process: discovery from the log, the guarded fetch, the stores, sealing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from service.archive.files import archive_entries, file_chunks, find_copy
from service.archive.stores import ArchiveStore, open_store
from service.archive.urls import output_urls
from service.archive.worker import Archiver, Tuning
from service.core.hosts import HostPolicy
from service.core.pace import Pace, RateMeter
from service.db import store
from service.db.store import Delivery
from service.db.vault import Vault
from service.ingest.committer import GroupCommitter
from service.net.guard import GuardedClient, Refused
from service.privacy.erasure import plan_erasure

from .fileserver import CUT, FileServer, png
from .s3 import S3
from .support import new_prediction_id, new_webhook_id

KEK = os.urandom(32)


def output_event(prediction_id: str, output: object, status: str = "succeeded") -> Delivery:
    body = json.dumps({"id": prediction_id, "status": status, "output": output})
    return Delivery(
        webhook_id=new_webhook_id(),
        prediction_id=prediction_id,
        status=status,
        source="webhook",
        body=body.encode(),
        received_at=datetime.now(UTC),
    )


class Harness:
    """An archiver on the test's database, driven pass by pass (no background timing)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        archive: ArchiveStore,
        vault: Vault,
        policy: HostPolicy,
        spool: Path,
        cap: int,
    ) -> None:
        self.pool, self.vault = pool, vault
        tuning = Tuning(concurrency=2, retry_base=0.01, poll=0.01)
        self.archiver = Archiver(pool, archive, vault, policy, spool, cap, tuning)
        self.store = archive

    async def append(self, *deliveries: Delivery) -> None:
        async with self.pool.acquire() as conn:
            await store.append(conn, list(deliveries), self.vault.prepare)

    async def settle(self, limit: float = 20) -> None:
        """Discover everything, then work until no job is pending."""
        deadline = asyncio.get_running_loop().time() + limit
        while await self.archiver.discover_pass() == 0.0:
            pass
        while asyncio.get_running_loop().time() < deadline:
            await self.archiver.discover_pass()
            await self.archiver.slot_pass()
            async with self.pool.acquire() as conn:
                if not await conn.fetchval("SELECT count(*) FROM archive_jobs WHERE status = 'pending'"):
                    return
            await asyncio.sleep(0.01)
        raise AssertionError("archive jobs still pending")

    async def rows(self) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            return await conn.fetch("SELECT * FROM archive_jobs ORDER BY created_at")

    async def served(self, sha256: str) -> bytes:
        async with self.pool.acquire() as conn:
            found = await find_copy(conn, sha256, self.vault, admin=True)
        assert found is not None
        return b"".join([chunk async for chunk in file_chunks(self.store, found)])


@pytest.fixture
def harness_for(dsn: str, tmp_path: Path):
    """`async with harness_for(origin, store_url, vault, max_bytes) as h`: a Harness on the test's
    database, closed on the loop that made it."""

    @contextlib.asynccontextmanager
    async def build(origin: str, store_url: str | None = None, vault: Vault | None = None,
                    max_bytes: int = 10_000_000) -> AsyncIterator[Harness]:  # fmt: skip
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        archive = open_store(store_url or (tmp_path / "files").as_uri())
        assert archive is not None
        (tmp_path / "spool").mkdir(exist_ok=True)
        harness = Harness(
            pool, archive, vault or Vault(), HostPolicy([origin]), tmp_path / "spool", max_bytes
        )
        try:
            yield harness
        finally:
            await harness.archiver.client.aclose()
            await pool.close()

    return build


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_stored_bytes_equal_served_and_a_url_in_three_events_is_fetched_once(
    harness_for, files: FileServer
) -> None:
    """The stored copy has the served bytes, type and hash; three events carrying one URL: one GET."""
    body = png(7, 64)
    url = files.add("/out/a.png", body, "image/png")
    prediction = new_prediction_id()

    async def scenario() -> None:
        async with harness_for(files.origin) as h:
            await h.append(output_event(prediction, [url], "processing"))
            await h.append(output_event(prediction, [url]), output_event(prediction, {"images": [url]}))
            await h.settle()
            [row] = await h.rows()
            assert (
                row["status"] == "stored" and row["size"] == len(body) and row["content_type"] == "image/png"
            )
            assert await h.served(row["sha256"]) == body
            assert await h.store.keys() == [row["object_key"]]
            async with h.pool.acquire() as conn:
                [item] = await archive_entries(conn, {"output": [url]}, HostPolicy([files.origin]))
            sha = row["sha256"]
            assert item == {"url": url, "status": "stored", "file": f"/files/{sha}", "sha256": sha,
                            "size": len(body), "content_type": "image/png"}  # fmt: skip

    run(scenario())
    assert files.counts()["/out/a.png"] == 1


def test_503_twice_then_200_is_stored(harness_for, files: FileServer) -> None:
    """A 503 is retried with backoff; the third attempt stores the file."""
    url = files.add("/flaky.png", png(1))
    files.script["/flaky.png"] = [503, 503]

    async def scenario() -> None:
        async with harness_for(files.origin) as h:
            await h.append(output_event(new_prediction_id(), url))
            await h.settle()
            [row] = await h.rows()
            assert (row["status"], row["attempts"], row["reason"]) == ("stored", 3, None)

    run(scenario())
    assert files.counts()["/flaky.png"] == 3


def test_a_name_that_does_not_resolve_yet_is_retried_not_failed(harness_for, files: FileServer) -> None:
    """A DNS lookup that fails (a resolver hiccup) is retried like a connection error: the file is
    stored once the name resolves again, instead of ending `failed` at the first miss."""
    port = files.server_address[1]
    origin = f"http://files.relay-test:{port}"
    url = files.add("/dns.png", png(4))
    answers: list[list[str]] = [[]]  # the first lookup fails, later ones find the file server

    async def flaky(host: str, _port: int) -> list[str]:
        if answers and not answers.pop(0):
            raise OSError("Temporary failure in name resolution")
        return ["127.0.0.1"]

    async def scenario() -> None:
        async with harness_for(origin) as h:
            await h.archiver.client.aclose()
            h.archiver.client = GuardedClient(HostPolicy([origin]), resolve=flaky)
            await h.append(output_event(new_prediction_id(), origin + "/dns.png"))
            await h.archiver.discover_pass()
            await h.archiver.slot_pass()
            [row] = await h.rows()
            assert (row["status"], row["reason"]) == ("pending", "the host name does not resolve")
            await h.settle()
            [row] = await h.rows()
            assert row["status"] == "stored" and row["attempts"] == 2

    run(scenario())
    assert url.endswith("/dns.png") and files.counts()["/dns.png"] == 1


def test_retries_end_failed_with_the_reason_once_the_url_has_expired(harness_for, files: FileServer) -> None:
    """A URL still failing when its hour is over ends `failed`, naming the last error."""
    url = files.add("/down.png", png(2))
    files.script["/down.png"] = [503] * 50

    async def scenario() -> None:
        async with harness_for(files.origin) as h:
            await h.append(output_event(new_prediction_id(), url))
            await h.archiver.discover_pass()
            async with h.pool.acquire() as conn:
                await conn.execute("UPDATE archive_jobs SET give_up_at = now() + interval '1 second'")
            await h.settle()
            [row] = await h.rows()
            assert row["status"] == "failed" and row["reason"].startswith("HTTP 503 (gave up after")

    run(scenario())


def test_disallowed_origin_and_a_redirect_to_loopback_are_never_requested(
    harness_for, files: FileServer, elsewhere: FileServer
) -> None:
    """An output URL outside RELAY_ARCHIVE_HOSTS is no job; a redirect ends failed and is not followed."""
    secret = elsewhere.add("/secret", b"internal")
    moved = files.add("/moved.png", png(3))
    files.script["/moved.png"] = [f"302 {secret}"]

    async def scenario() -> None:
        async with harness_for(files.origin) as h:
            await h.append(output_event(new_prediction_id(), [secret, moved]))
            await h.settle()
            [row] = await h.rows()
            assert row["status"] == "failed" and row["reason"].startswith("redirect refused (HTTP 302)")
            assert await h.store.keys() == []

    run(scenario())
    assert elsewhere.counts() == {}


def test_the_guard_refuses_private_addresses_unless_the_origin_is_explicit() -> None:
    """A wildcard host resolving to loopback, private or link-local is refused before connecting."""

    async def resolve_to(address: str):
        async def resolver(host: str, port: int) -> list[str]:
            return [address]

        return resolver

    async def scenario() -> None:
        for address in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "::ffff:127.0.0.1", "100.64.0.1"):
            client = GuardedClient(HostPolicy(["https://*.example.test"]), resolve=await resolve_to(address))
            with pytest.raises(Refused, match="private, loopback or link-local"):
                async with client.stream("https://files.example.test/x.png"):
                    pass
            await client.aclose()
        client = GuardedClient(HostPolicy(["https://*.example.test"]))
        for url in ("http://files.example.test/x", "https://example.org/x", "ftp://files.example.test/x"):
            with pytest.raises(Refused, match="origin is not an allowed one"):
                async with client.stream(url):
                    pass
        await client.aclose()

    run(scenario())


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_file_over_the_cap_fails_and_nothing_is_kept(
    harness_for, files: FileServer, tmp_path: Path, chunked: bool
) -> None:
    """Over RELAY_ARCHIVE_MAX_BYTES (declared or counted while streaming): failed, no object, no spool."""
    files.chunked = chunked
    url = files.add("/big.bin", os.urandom(50_000), "application/octet-stream")

    async def scenario() -> None:
        async with harness_for(files.origin, max_bytes=20_000) as h:
            await h.append(output_event(new_prediction_id(), url))
            await h.settle()
            [row] = await h.rows()
            assert row["status"] == "failed" and row["reason"].startswith("too large")
            assert await h.store.keys() == []

    run(scenario())
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_body_that_stops_halfway_is_retried_and_never_stored_partly(harness_for, files: FileServer) -> None:
    """A connection closed mid-body is a retry; only the complete file is ever stored."""
    body = png(4, 128)
    url = files.add("/cut.png", body)
    files.script["/cut.png"] = [CUT]

    async def scenario() -> None:
        async with harness_for(files.origin) as h:
            await h.append(output_event(new_prediction_id(), url))
            await h.settle()
            [row] = await h.rows()
            assert (
                row["status"] == "stored" and row["attempts"] == 2 and await h.served(row["sha256"]) == body
            )

    run(scenario())


def test_a_lying_content_type_is_replaced_by_what_the_bytes_are(harness_for, files: FileServer) -> None:
    """Bytes decide the stored type; an unproven or unsafe claim (text/html) is served as octet-stream."""
    liar = files.add("/liar.png", b"<html><script>alert(1)</script></html>", "image/png")
    html = files.add("/page", b"<html></html>", "text/html")
    real = files.add("/real", png(5), "text/html")

    async def scenario() -> None:
        async with harness_for(files.origin) as h:
            await h.append(output_event(new_prediction_id(), [liar, html, real]))
            await h.settle()
            types = {row["sha256"]: row["content_type"] for row in await h.rows()}
            assert sorted(types.values()) == [
                "application/octet-stream",
                "application/octet-stream",
                "image/png",
            ]

    run(scenario())


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """A real S3-protocol server (moto's ThreadedMotoServer) with the AWS variables pointing at it."""
    with S3() as server:
        yield server


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_s3_and_file_stores_keep_the_bytes(harness_for, files: FileServer, s3: S3, kind: str) -> None:
    """Both stores keep the file under its SHA-256 and serve it back byte for byte."""
    body = os.urandom(300_000)
    url = files.add("/blob.bin", body, "application/octet-stream")

    async def scenario() -> None:
        async with harness_for(files.origin, s3.new_bucket() if kind == "s3" else None) as h:
            await h.append(output_event(new_prediction_id(), url))
            await h.settle()
            [row] = await h.rows()
            assert await h.store.keys() == [f"{row['sha256'][:2]}/{row['sha256']}"]
            assert await h.served(row["sha256"]) == body

    run(scenario())


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_encrypted_files_are_sealed_and_forget_deletes_them(
    harness_for, files: FileServer, s3: S3, kind: str
) -> None:
    """With a key, the store holds ciphertext only; forgetting the prediction removes its files."""
    body = png(6, 200)
    url = files.add("/private.png", body)
    other_url = files.add("/other.png", png(8))
    vault = Vault([KEK])
    prediction, other = new_prediction_id(), new_prediction_id()

    async def scenario() -> None:
        async with harness_for(files.origin, s3.new_bucket() if kind == "s3" else None, vault) as h:
            await h.append(output_event(prediction, [url]), output_event(other, [other_url]))
            await h.settle()
            rows = {row["prediction_id"]: row for row in await h.rows()}
            mine = rows[prediction]
            assert mine["encrypted"] and url.encode() not in bytes(mine["url"])
            stored = b"".join([c async for c in h.store.chunks(mine["object_key"])])
            assert body not in stored and body[:64] not in stored and len(stored) > len(body)
            assert await h.served(mine["sha256"]) == body
            async with h.pool.acquire() as conn:
                erasure = await plan_erasure(conn, vault, prediction)
            await h.append(erasure)
            await h.archiver.discover_pass()
            assert await h.store.keys() == [rows[other]["object_key"]]
            assert [r["prediction_id"] for r in await h.rows()] == [other]

    run(scenario())


def test_host_policy_matches_origins_exactly_and_wildcards_for_https_only() -> None:
    """Scheme, host and port must match; `*.` covers subdomains only; http needs an exact origin."""
    policy = HostPolicy(
        ["https://replicate.delivery", "https://*.replicate.delivery", "http://127.0.0.1:8001"]
    )
    allowed = [
        "https://replicate.delivery/x.png",
        "https://PBXT.Replicate.Delivery/a/b.webp",
        "https://replicate.delivery:443/x",
        "http://127.0.0.1:8001/outputs/p/out-0.png",
    ]
    refused = [
        "http://replicate.delivery/x.png",
        "https://replicate.delivery.evil.com/x",
        "https://evilreplicate.delivery/x",
        "https://replicate.delivery:8443/x",
        "https://user:pw@replicate.delivery/x",
        "http://127.0.0.1:8002/x",
        "http://127.0.0.1/x",
        "file:///etc/passwd",
        "data:image/png;base64,AAAA",
    ]
    assert [policy.allows(url) for url in allowed] == [True] * len(allowed)
    assert [policy.allows(url) for url in refused] == [False] * len(refused)
    assert policy.target("http://127.0.0.1:8001/x").explicit  # type: ignore[union-attr]
    assert not policy.target("https://a.replicate.delivery/x").explicit  # type: ignore[union-attr]


def test_output_urls_are_found_anywhere_in_the_output_once_each() -> None:
    """Strings, lists and nested objects; duplicates once; non-output fields and other hosts ignored."""
    policy = HostPolicy(["https://*.example.test"])
    prediction = {
        "input": {"image": "https://in.example.test/input.png"},
        "output": {"images": ["https://a.example.test/1.png", {"url": "https://a.example.test/2.png"}],
                   "again": "https://a.example.test/1.png", "other": "https://elsewhere.test/3.png",
                   "n": 3, "text": "not a url"},
    }  # fmt: skip
    assert output_urls(prediction, policy) == ["https://a.example.test/1.png", "https://a.example.test/2.png"]
    assert output_urls({"output": "https://b.example.test/x"}, policy) == ["https://b.example.test/x"]
    assert output_urls({"output": None}, policy) == [] and output_urls("erased", policy) == []


def test_a_store_that_fails_is_retried_not_a_hot_loop(harness_for, files: FileServer, s3: S3) -> None:
    """An S3 put that fails (no such bucket) leaves the job pending with the store's error, backed off."""
    url = files.add("/unstored.png", png(9))

    async def scenario() -> None:
        async with harness_for(files.origin, "s3://relay-no-such-bucket/outputs") as h:
            await h.append(output_event(new_prediction_id(), url))
            await h.archiver.discover_pass()
            await h.archiver.slot_pass()
            [row] = await h.rows()
            assert row["status"] == "pending" and row["attempts"] == 1
            assert row["reason"].startswith("the store failed (") and row["next_at"] > row["created_at"]

    run(scenario())


def test_downloads_yield_to_a_burst_of_webhooks_unless_the_url_is_about_to_expire(
    harness_for, files: FileServer
) -> None:
    """While the committer commits 250+ deliveries a second, downloads start at most 20 a second
    (spaced, every file still stored); a job 15 minutes from its URL's expiry, or any job once
    ingest is quiet, goes at once."""
    urls = [files.add(f"/burst/{n}.png", png(40 + n)) for n in range(5)]
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    async def burst(pool: asyncpg.Pool) -> RateMeter:
        committer = GroupCommitter(pool)
        committer.committed = RateMeter(clock=lambda: 0.0)  # one second, however slow the machine
        committer.start()
        starting = [output_event(new_prediction_id(), None, "starting") for _ in range(300)]
        await asyncio.gather(*(committer.submit(delivery) for delivery in starting))
        await committer.stop()
        return committer.committed

    async def scenario() -> None:
        async with harness_for(files.origin) as h:
            h.archiver.ingest_rate = (await burst(h.pool)).rate
            h.archiver.pace = Pace(20, clock=lambda: 0.0, sleep=record)
            await h.append(*(output_event(new_prediction_id(), url) for url in urls[:3]))
            await h.settle()
            assert waits == pytest.approx([0.05, 0.10])  # the first at once, then 1/20 s apart

            await h.append(output_event(new_prediction_id(), urls[3]))
            await h.archiver.discover_pass()
            async with h.pool.acquire() as conn:
                await conn.execute("UPDATE archive_jobs SET give_up_at = now() + interval '10 minutes'"
                                   " WHERE status = 'pending'")  # fmt: skip
            await h.settle()
            h.archiver.ingest_rate = lambda: 0
            await h.append(output_event(new_prediction_id(), urls[4]))
            await h.settle()
            assert len(waits) == 2, "an urgent job or a quiet ingest was held back"
            assert [row["status"] for row in await h.rows()] == ["stored"] * 5

    run(scenario())


def test_the_rate_meter_counts_the_last_whole_second() -> None:
    """A burst counts at once; a second later it is the last second's count; after a gap, zero."""
    now = [10.2]
    meter = RateMeter(clock=lambda: now[0])
    meter.add(300)
    assert meter.rate() == 300
    now[0] = 11.5
    meter.add(20)
    assert meter.rate() == 300  # the whole second before still counts
    now[0] = 12.1
    assert meter.rate() == 20
    now[0] = 14.0
    assert meter.rate() == 0
