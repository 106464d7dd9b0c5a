"""Per-key request quotas for the predictions API, counted in Postgres.

The counters live in the shared database, so N Relay instances behind a load balancer enforce
one limit together. Windows are fixed (one hour, aligned on the database clock); each request
is one upsert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import asyncpg

from service.core.auth import key_hash
from service.core.errors import RelayError

__all__ = ["OverLimit", "Quota", "key_hash", "take"]

WINDOW_SECONDS = 3600

COUNT_REQUEST = """
WITH w AS (SELECT to_timestamp(floor(extract(epoch FROM now()) / $2::int) * $2::int) AS start)
INSERT INTO api_rate_limits AS r (key_hash, window_start, used)
SELECT $1, w.start, 1 FROM w
ON CONFLICT (key_hash, window_start) DO UPDATE SET used = r.used + 1
RETURNING used, extract(epoch FROM window_start + $2::int * interval '1 second' - now())::float8 AS left
"""


class OverLimit(RelayError):
    status = 429
    code = "RATE_LIMIT_ERROR"


@dataclass(frozen=True)
class Quota:
    limit: int
    used: int
    reset: int  # seconds until the window ends

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
        }


async def take(pool: asyncpg.Pool, key: str, limit: int) -> Quota:
    """Count one request for `key`; OverLimit (429 with Retry-After) once the window is used up."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(COUNT_REQUEST, key_hash(key), WINDOW_SECONDS)
    assert row is not None  # an upsert with RETURNING yields its row
    quota = Quota(limit, row["used"], max(1, math.ceil(row["left"])))
    if quota.used > limit:
        raise OverLimit(
            f"this API key has used its {limit} requests for this hour (RELAY_API_RATE_LIMIT); "
            f"retry in {quota.reset}s",
            headers={**quota.headers(), "Retry-After": str(quota.reset)},
        )
    return quota
