"""Replicate's REST API: one pooled `httpx.AsyncClient` per process, retries, and error mapping.

Safe calls (get, list, cancel) retry rate limits, 5xx answers and network errors with capped
exponential backoff and jitter, waiting at least what `Retry-After` asks. A create is retried
only after a 429, the one answer that proves the prediction was not made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from service.core.errors import NotFound, RelayError, error_class
from service.core.metrics import UPSTREAM_REQUESTS
from service.core.retry import Backoff, retry_after_seconds
from service.core.settings import Settings
from service.core.validation import check_prediction_id

CONNECT_TIMEOUT = 5.0
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0
# A longer Retry-After is not waited out inside a request: the caller gets the 429 instead.
RETRY_AFTER_MAX = 10.0

UpstreamInvalid = error_class("UpstreamInvalid", 400, "INVALID_REQUEST")
AuthenticationError = error_class("AuthenticationError", 401, "AUTHENTICATION_ERROR")
FileTooLarge = error_class("FileTooLarge", 413, "FILE_TOO_LARGE")
ProcessingError = error_class("ProcessingError", 502, "PROCESSING_ERROR")
NetworkError = error_class("NetworkError", 502, "NETWORK_ERROR")
UpstreamTimeout = error_class("UpstreamTimeout", 504, "TIMEOUT")
UnknownError = error_class("UnknownError", 502, "UNKNOWN_ERROR")


class RateLimitError(RelayError):
    status = 429
    code = "RATE_LIMIT_ERROR"

    def __init__(self, message: str, retry_after: float):
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after)))})
        self.retry_after = retry_after


RETRYABLE_WHEN_SAFE = (RateLimitError, ProcessingError, NetworkError, UpstreamTimeout)


def _detail(response: httpx.Response) -> str:
    """Replicate's own explanation (`detail`, or `title`), shortened; never the request."""
    try:
        body = response.json()
    except ValueError:
        return ""
    text = body.get("detail") or body.get("title") if isinstance(body, dict) else None
    return str(text)[:500] if text else ""


def error_for(response: httpx.Response, what: str) -> RelayError:
    """The Relay error for a non-2xx answer from Replicate."""
    status, detail = response.status_code, _detail(response)
    said = f": {detail}" if detail else ""
    if status in (400, 422):
        return UpstreamInvalid(f"Replicate refused the request ({status}){said}")
    if status in (401, 403):
        return AuthenticationError(
            f"Replicate refused REPLICATE_API_TOKEN ({status}); check the token configured for Relay"
        )
    if status == 404:
        return NotFound(f"Replicate has no {what}")
    if status == 413:
        return FileTooLarge(f"Replicate says the request or a file in it is too large{said}")
    if status == 429:
        wait = retry_after_seconds(response.headers.get("retry-after"))
        return RateLimitError(
            f"Replicate's rate limit was hit{said}; retry later", 1.0 if wait is None else wait
        )
    if status >= 500:
        return ProcessingError(f"Replicate failed with {status}{said}")
    return UnknownError(f"Replicate answered {status} unexpectedly{said}")


@dataclass(frozen=True)
class Reply:
    """A 2xx answer: its JSON object and the exact bytes Replicate sent."""

    data: dict[str, Any]
    body: bytes


class Upstream:
    """Replicate's API at `REPLICATE_API_BASE`, authenticated with `REPLICATE_API_TOKEN`."""

    def __init__(self, settings: Settings):
        assert settings.replicate_api_token is not None
        self.policy = Backoff(
            attempts=settings.upstream_retries + 1,
            base=BACKOFF_INITIAL,
            cap=BACKOFF_MAX,
            max_retry_after=RETRY_AFTER_MAX,
            jitter=BACKOFF_INITIAL,
        )
        self.client = httpx.AsyncClient(
            base_url=settings.replicate_api_base + "/",
            headers={"Authorization": f"Bearer {settings.replicate_api_token}"},
            timeout=httpx.Timeout(settings.upstream_timeout, connect=CONNECT_TIMEOUT),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def create(self, path: str, payload: dict[str, Any]) -> Reply:
        return await self._call("POST", path, "such model or version", safe=False, json=payload)

    async def get(self, prediction_id: str) -> Reply:
        path = f"predictions/{check_prediction_id(prediction_id)}"
        return _for(prediction_id, await self._call("GET", path, f"prediction {prediction_id!r}"))

    async def cancel(self, prediction_id: str) -> Reply:
        # Canceling twice is harmless, so a cancel may be retried like a read.
        path = f"predictions/{check_prediction_id(prediction_id)}/cancel"
        return _for(prediction_id, await self._call("POST", path, f"prediction {prediction_id!r}"))

    async def list(self, cursor: str | None) -> Reply:
        params = {"cursor": cursor} if cursor else None
        return await self._call("GET", "predictions", "prediction list", params=params)

    async def _call(self, method: str, path: str, what: str, safe: bool = True, **kwargs: Any) -> Reply:
        retryable = RETRYABLE_WHEN_SAFE if safe else (RateLimitError,)
        failures = 0
        while True:
            try:
                return await self._send(method, path, what, **kwargs)
            except retryable as error:
                failures += 1
                asked = error.retry_after if isinstance(error, RateLimitError) else None
                wait = self.policy.delay(failures, asked)
                if wait is None:
                    raise
                await asyncio.sleep(wait)

    async def _send(self, method: str, path: str, what: str, **kwargs: Any) -> Reply:
        try:
            reply = await self._attempt(method, path, what, **kwargs)
        except RelayError as error:
            UPSTREAM_REQUESTS.labels(error.code).inc()
            raise
        UPSTREAM_REQUESTS.labels("ok").inc()
        return reply

    async def _attempt(self, method: str, path: str, what: str, **kwargs: Any) -> Reply:
        try:
            response = await self.client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise UpstreamTimeout("Replicate did not answer in time (RELAY_UPSTREAM_TIMEOUT)") from None
        except httpx.TransportError as exc:
            raise NetworkError(f"cannot reach Replicate's API ({type(exc).__name__})") from None
        if not response.is_success:
            raise error_for(response, what)
        return _reply(response)


def _for(prediction_id: str, reply: Reply) -> Reply:
    """The answer about `prediction_id`, never another: the caller was allowed this id only, and
    its answer carries a subscriber token for the id it names."""
    if reply.data.get("id") != prediction_id:
        raise UnknownError(f"Replicate answered for another prediction than {prediction_id!r}")
    return reply


def _reply(response: httpx.Response) -> Reply:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise UnknownError(f"Replicate answered {response.status_code} with a body that is not a JSON object")
    return Reply(data, response.content)


def relay_list_url(upstream_url: str | None, base_url: str) -> str | None:
    """Replicate's `next`/`previous` page URL as the same page of Relay's list route."""
    if not upstream_url:
        return None
    cursor = httpx.URL(upstream_url).params.get("cursor")
    if not cursor:
        return None
    return str(httpx.URL(f"{base_url}/api/predictions", params={"cursor": cursor}))


def list_page(data: Mapping[str, Any], base_url: str) -> dict[str, Any]:
    """Replicate's page with its links as Relay URLs; UNKNOWN_ERROR (502) when it is not a page
    (`results` a list, `next`/`previous` a URL or null), rather than a 500 on a malformed answer."""
    links_ok = all(isinstance(data.get(name), str | None) for name in ("next", "previous"))
    if not isinstance(data.get("results"), list) or not links_ok:
        raise UnknownError("Replicate answered the prediction list with a body that is not a page")
    return {
        **data,
        "next": relay_list_url(data.get("next"), base_url),
        "previous": relay_list_url(data.get("previous"), base_url),
    }
