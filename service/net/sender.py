"""POST one event, signed with Standard Webhooks, to a receiver: what replay and destinations send.

Each try is signed afresh (a new `webhook-timestamp`) under the event's **original** `webhook-id`,
so receivers de-duplicate. Redirects are never followed: a 3xx is a failure like any non-2xx. The
retry arithmetic is `core.retry`'s; this module only speaks HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx

from service.core.retry import Backoff, retry_after_seconds, retryable_status
from service.core.signatures import signed_headers

TIMEOUT = 15.0
CONNECT_TIMEOUT = 10.0


def new_client(timeout: float = TIMEOUT, connections: int | None = None) -> httpx.AsyncClient:
    """An HTTP client for receivers: no redirects followed, `timeout` seconds per request."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        follow_redirects=False,
        timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)),
        limits=limits,
    )


@dataclass(frozen=True)
class Attempt:
    """What one POST came to: `ok` for a 2xx; else why not, and whether a retry may help."""

    ok: bool
    status: int | None = None
    reason: str | None = None
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        return not self.ok and (self.status is None or retryable_status(self.status))


async def post_signed(
    http: httpx.AsyncClient,
    url: str,
    key: bytes,
    webhook_id: str,
    body: bytes,
    headers: Mapping[str, str] | None = None,
) -> Attempt:
    """One signed POST of `body` as it is; never raises for what the receiver or network does."""
    signed = {**signed_headers(key, webhook_id, body), **(headers or {})}
    try:
        response = await http.post(url, content=body, headers=signed)
    except httpx.TimeoutException:
        return Attempt(False, reason="timed out")
    except httpx.TransportError as exc:
        return Attempt(False, reason=f"network error ({type(exc).__name__})")
    status = response.status_code
    if 200 <= status < 300:
        return Attempt(True, status)
    reason = f"HTTP {status}"
    if 300 <= status < 400:
        reason += " redirect, not followed"
    return Attempt(False, status, reason, retry_after_seconds(response.headers.get("retry-after")))


async def deliver(
    http: httpx.AsyncClient,
    url: str,
    key: bytes,
    webhook_id: str,
    body: bytes,
    policy: Backoff,
    on_retry: Callable[[], None] = lambda: None,
) -> Attempt:
    """`post_signed`, retried within the call while `policy` allows (429, 5xx, network errors)."""
    failures = 0
    while True:
        attempt = await post_signed(http, url, key, webhook_id, body)
        if attempt.ok or not attempt.retryable:
            return attempt
        failures += 1
        wait = policy.delay(failures, attempt.retry_after)
        if wait is None:
            return Attempt(False, attempt.status, f"{attempt.reason} after {failures} attempts")
        on_retry()
        await asyncio.sleep(wait)
