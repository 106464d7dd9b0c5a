"""The one retry policy (service/core/retry.py): schedules, backoff, jitter and Retry-After."""

from __future__ import annotations

import random

import pytest

from service.core.errors import ConfigError
from service.core.retry import (
    DEFAULT_SCHEDULE,
    Backoff,
    parse_schedule,
    retryable_status,
    scheduled_delay,
)
from service.core.settings import load_settings


def test_the_default_schedule_is_the_contract():
    assert DEFAULT_SCHEDULE == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    assert load_settings({"DATABASE_URL": "postgresql://x/y"}, required=()).retry_schedule == DEFAULT_SCHEDULE


@pytest.mark.parametrize("text", ["", "a,b", "1,,2", "-1", "nan", "inf", "1e9", ",".join(["1"] * 51)])
def test_a_bad_schedule_is_refused_with_its_name(text):
    with pytest.raises(ConfigError, match="RELAY_RETRY_SCHEDULE"):
        parse_schedule(text)


def test_a_schedule_gives_one_delay_per_attempt_with_jitter_then_none():
    """After n failures the wait is schedule[n] ±20 %; after the last attempt, exhausted (None)."""
    schedule = parse_schedule("0,0.2,0.5")
    rng = random.Random(7)
    for failures, planned in ((1, 0.2), (2, 0.5)):
        waits = [scheduled_delay(schedule, failures, rng=rng) for _ in range(200)]
        assert all(0.8 * planned <= w <= 1.2 * planned for w in waits)  # type: ignore[operator]
        assert max(waits) - min(waits) > 0.1 * planned, "no jitter"  # type: ignore[operator]
    assert scheduled_delay(schedule, 3) is None


def test_retry_after_lengthens_a_scheduled_wait_up_to_the_longest_step_never_shortens_it():
    schedule = (0, 1, 10)
    assert 5 <= scheduled_delay(schedule, 1, retry_after=5) <= 12  # type: ignore[operator]
    assert scheduled_delay(schedule, 1, retry_after=3600) == 10
    assert 0.8 <= scheduled_delay(schedule, 1, retry_after=0) <= 1.2  # type: ignore[operator]


def test_backoff_grows_is_capped_and_gives_up_on_a_long_retry_after():
    policy = Backoff(attempts=4, base=0.2, cap=0.5, max_retry_after=10, jitter=0.2)
    assert 0.2 <= policy.delay(1) <= 0.4  # type: ignore[operator]
    assert 0.4 <= policy.delay(2) <= 0.6  # type: ignore[operator]
    assert 0.5 <= policy.delay(3) <= 0.7  # type: ignore[operator]
    assert policy.delay(4) is None
    assert policy.delay(1, retry_after=3) == 3
    assert policy.delay(1, retry_after=11) is None
    capped = Backoff(attempts=3, base=0.5, cap=30, max_retry_after=120, floor=0.5, cap_retry_after=True)
    assert capped.delay(1, retry_after=500) == 120


def test_what_is_worth_retrying():
    assert [s for s in (200, 302, 400, 404, 409, 429, 500, 503) if retryable_status(s)] == [429, 500, 503]
