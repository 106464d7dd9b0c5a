"""POST one event, signed with Standard Webhooks, to a receiver: what replay and destinations send.

Each try is signed afresh (a new `webhook-timestamp`) under the event's **original** `webhook-id`,
so receivers de-duplicate. Redirects are never followed: a 3xx is a failure like any non-2xx. The
retry arithmetic is `core.retry`'s; this module only speaks HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httptools

from service.core.retry import Backoff, retry_after_seconds, retryable_status
from service.core.signatures import signed_headers
from service.net.guard import Refused, public_only
from service.net.http1 import Pool

TIMEOUT = 15.0
DEFAULT_CONNECTIONS = 16


def new_client(timeout: float = TIMEOUT, connections: int | None = None, *, public: bool = False) -> Pool:
    """Connections to receivers: keep-alive, no redirects followed, `timeout` seconds a request;
    with `public`, only to global addresses, checked at each connection (RELAY_REPLAY_PRIVATE)."""
    return Pool(timeout, connections or DEFAULT_CONNECTIONS, public_only() if public else None)


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
    http: Pool,
    url: str,
    key: bytes,
    webhook_id: str,
    body: bytes,
    headers: Mapping[str, str] | None = None,
) -> Attempt:
    """One signed POST of `body` as it is; never raises for what the receiver or network does."""
    signed = {**signed_headers(key, webhook_id, body), **(headers or {})}
    try:
        response = await http.post(url, body, signed)
    except TimeoutError:
        return Attempt(False, reason=f"timed out ({http.timeout:g} s)")
    except Refused as refused:
        return Attempt(False, reason=f"{refused.reason} (RELAY_REPLAY_PRIVATE=on allows it)")
    except (OSError, ValueError, httptools.HttpParserError) as exc:
        return Attempt(False, reason=f"network error ({type(exc).__name__})")
    status = response.status
    if 200 <= status < 300:
        return Attempt(True, status)
    reason = f"HTTP {status}"
    if 300 <= status < 400:
        reason += " redirect, not followed"
    return Attempt(False, status, reason, retry_after_seconds(response.headers.get("retry-after")))


async def deliver(
    http: Pool,
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
