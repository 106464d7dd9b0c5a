"""The monthly budget: one warning at 80 %, one error at 100 %, per UTC month, across restarts."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest

from service.core.settings import Settings
from service.ops.simulate import MODEL, lifecycle
from service.usage import budget

from .support import (
    PRICE,
    Log,
    RelayProcess,
    admin_headers,
    bodies,
    new_prediction_id,
    post_webhook,
    relay_env,
    wait_for,
)

SECONDS = 4.61  # predict_time of a simulated success


def check(dsn: str, settings: Settings, now: datetime) -> float:
    async def run() -> float:
        conn = await asyncpg.connect(dsn)
        try:
            return await budget.check(conn, settings, now)
        finally:
            await conn.close()

    return asyncio.run(run())


def alerts(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    found = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "relay.budget"]
    caplog.clear()
    return found


def test_alerts_fire_once_each_and_only_for_this_month(dsn, caplog):
    caplog.set_level(logging.INFO, logger="relay.budget")
    settings = Settings(prices={MODEL: PRICE}, budget=10 * PRICE)  # ten seconds of predict time
    log = Log(dsn)
    for body in bodies("succeeded", predict_time=50.0):  # last month: must not count
        log.add(body, datetime(2022, 4, 30, 23, 59, 59, tzinfo=UTC))
    for body in bodies("succeeded", predict_time=7.0):
        log.add(body, datetime(2022, 5, 1, tzinfo=UTC))
    log.commit()
    now = datetime(2022, 5, 20, tzinfo=UTC)
    assert check(dsn, settings, now) == pytest.approx(7.0 * PRICE)
    assert alerts(caplog) == []

    for body in bodies("succeeded", predict_time=1.5):
        log.add(body, datetime(2022, 5, 19, tzinfo=UTC))
    log.commit()
    check(dsn, settings, now)
    check(dsn, settings, now)
    (warning,) = alerts(caplog)
    assert warning[0] == "WARNING" and "2022-05" in warning[1] and "80%" in warning[1]

    for body in bodies("failed", predict_time=2.0):
        log.add(body, datetime(2022, 5, 20, tzinfo=UTC))
    log.commit()
    assert check(dsn, settings, now) == pytest.approx(10.5 * PRICE)
    check(dsn, settings, now)
    (error,) = alerts(caplog)
    assert error[0] == "ERROR" and "100%" in error[1]

    check(dsn, settings, datetime(2022, 6, 1, tzinfo=UTC))  # a new month starts from zero
    assert alerts(caplog) == []


def test_unpriced_models_add_nothing_to_spend(dsn):
    settings = Settings(prices={MODEL: PRICE}, budget=1.0)
    log = Log(dsn)
    for body in bodies("succeeded", model="acme/unpriced-model", predict_time=1000.0):
        log.add(body, datetime(2022, 7, 2, tzinfo=UTC))
    log.commit()
    assert check(dsn, settings, datetime(2022, 7, 3, tzinfo=UTC)) == 0


def metric(relay: RelayProcess, name: str) -> float | None:
    text = httpx.get(relay.url + "/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_alerts_are_not_repeated_after_a_restart(postgres):
    budget_usd = SECONDS * PRICE / 0.85  # one prediction: 85 %, two: 170 %
    env = relay_env(
        postgres.new_database(),
        RELAY_PRICES=f"{MODEL}={PRICE}",
        RELAY_BUDGET=str(budget_usd),
        RELAY_BUDGET_INTERVAL="1",
    )
    first = RelayProcess(env).start()
    try:
        wait_for(lambda: metric(first, "relay_budget_usd") == pytest.approx(budget_usd))
        with httpx.Client(base_url=first.url, timeout=30) as client:
            for count in (1, 2):
                for body in lifecycle(new_prediction_id()):
                    assert post_webhook(client, body).status_code == 200
                spend = count * SECONDS * PRICE
                wait_for(lambda spend=spend: metric(first, "relay_spend_usd") == pytest.approx(spend))
    finally:
        first.stop()
    with RelayProcess(env) as second:
        wait_for(lambda: metric(second, "relay_spend_usd") == pytest.approx(2 * SECONDS * PRICE))
        usage = httpx.get(second.url + "/admin/usage", headers=admin_headers()).json()["this_month"]
        assert usage["budget"] == pytest.approx(budget_usd) and usage["used"] == pytest.approx(1.7, abs=1e-3)
        time.sleep(2.5)  # two more checks past both thresholds
    output = first.output + second.output
    warnings = [line for line in output.splitlines() if "WARNING relay.budget" in line]
    errors = [line for line in output.splitlines() if "ERROR relay.budget" in line]
    assert len(warnings) == 1 and "80%" in warnings[0]
    assert len(errors) == 1 and "100%" in errors[0]
