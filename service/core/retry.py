"""The one retry policy of every outbound call: which answers are worth retrying, how long to
wait (capped exponential backoff or a fixed schedule, with jitter), and `Retry-After`. Pure.

Used by the Replicate client (`upstream.client`), the signed sender (`net.sender`, for replay
and destinations) and `relay simulate`; none of them keeps its own loop arithmetic.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from service.core.errors import ConfigError

# The default RELAY_RETRY_SCHEDULE: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_SCHEDULE: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
SCHEDULE_JITTER = 0.2  # a scheduled delay is spread over ±20 %, so failed receivers are not stampeded
MAX_SCHEDULE_ENTRIES = 50
_RNG = random.Random()


def retryable_status(status: int) -> bool:
    """A 429 (rate limited) or a 5xx may succeed later; other answers will not change."""
    return status == 429 or status >= 500


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds: a number, or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class Backoff:
    """Retries a few times within one call: capped exponential steps with jitter.

    `attempts` counts every try (the first included). A `Retry-After` longer than
    `max_retry_after` is not waited out: `delay` says to give up and hand the answer back (or,
    with `cap_retry_after`, waits `max_retry_after`).
    """

    attempts: int
    base: float
    cap: float
    max_retry_after: float
    floor: float = 1.0  # multiplicative jitter: a step is spread over [floor × step, step]
    jitter: float = 0.0  # additive jitter: up to this many seconds more
    cap_retry_after: bool = False  # wait at most max_retry_after instead of giving up

    def step(self, failures: int, rng: random.Random | None = None) -> float:
        """The wait after `failures` failed tries (1 = after the first)."""
        rng = rng or _RNG
        step: float = min(self.cap, self.base * 2.0 ** max(0, failures - 1))
        return step * rng.uniform(self.floor, 1.0) + rng.uniform(0.0, self.jitter)

    def delay(self, failures: int, retry_after: float | None = None) -> float | None:
        """How long to wait before the next try, or None when the call should give up."""
        if failures >= self.attempts:
            return None
        if retry_after is not None and retry_after > self.max_retry_after:
            if not self.cap_retry_after:
                return None
            retry_after = self.max_retry_after
        return max(retry_after or 0.0, self.step(failures))


def exponential(failures: int, base: float, cap: float, spread: float = SCHEDULE_JITTER) -> float:
    """`base × 2^(failures-1)`, capped, spread over ±`spread` (background work: the archive)."""
    step: float = min(cap, base * 2.0 ** max(0, failures - 1))
    return step * _RNG.uniform(1 - spread, 1 + spread)


def parse_schedule(text: str, name: str = "RELAY_RETRY_SCHEDULE") -> tuple[float, ...]:
    """`0,5,300`: the delay before each attempt, in seconds (the first is the first attempt)."""
    try:
        delays = tuple(float(part) for part in text.split(","))
    except ValueError:
        delays = ()
    if (
        not delays
        or len(delays) > MAX_SCHEDULE_ENTRIES
        or not all(math.isfinite(d) and 0 <= d <= 7 * 86400 for d in delays)
    ):
        raise ConfigError(
            f"{name} must be comma-separated delays in seconds (0 to 604800, at most "
            f"{MAX_SCHEDULE_ENTRIES}), e.g. 0,5,300,1800; got {text[:60]!r}"
        )
    return delays


def scheduled_delay(
    schedule: Sequence[float],
    failures: int,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """The wait before the next attempt after `failures` failed ones, or None once the schedule
    is spent (the event is exhausted). A receiver's `Retry-After` lengthens a wait, up to the
    schedule's longest step, and never shortens one."""
    if failures >= len(schedule):
        return None
    planned = schedule[failures] * (rng or _RNG).uniform(1 - SCHEDULE_JITTER, 1 + SCHEDULE_JITTER)
    if retry_after is not None:
        planned = max(planned, min(retry_after, max(schedule)))
    return planned
