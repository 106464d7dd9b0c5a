"""How fast something happens, and keeping something else under a rate.

Background work (the archive's downloads) yields to the work a client waits for (webhook
ingest): the committer counts what it commits in a `RateMeter`, the archive reads it and, while
it is high, spaces its downloads with a `Pace`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class RateMeter:
    """Events per second over the last whole second; cheap enough to count every commit."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._second = int(clock())
        self._count = 0  # in the current second
        self._previous = 0  # in the second before it

    def add(self, count: int = 1) -> None:
        self._roll(int(self._clock()))
        self._count += count

    def rate(self) -> int:
        """The last whole second's count, or the current one's once it is higher (a burst that
        has just begun counts at once)."""
        self._roll(int(self._clock()))
        return max(self._previous, self._count)

    def _roll(self, second: int) -> None:
        if second == self._second:
            return
        self._previous = self._count if second == self._second + 1 else 0
        self._second, self._count = second, 0


class Pace:
    """At most `per_second` starts a second across every caller: each `wait()` is given the next
    free slot in time and sleeps until it."""

    def __init__(
        self,
        per_second: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.interval = 1.0 / per_second
        self._clock, self._sleep = clock, sleep
        self._next = 0.0

    async def wait(self) -> None:
        now = self._clock()
        start = max(now, self._next)
        self._next = start + self.interval
        if start > now:
            await self._sleep(start - now)
