"""The monthly budget: spend gauges, and one warning at 80 % and one error at 100 % per month.

Every instance checks periodically; an alert is logged only by the instance whose insert into
`budget_alerts` succeeds, so it is sent once per month and threshold, across instances and
restarts.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import asyncpg

from service.core.metrics import BUDGET_USD, SPEND_USD
from service.core.months import month_start
from service.core.settings import Settings
from service.db.connection import Connection
from service.usage.report import month_spend

log = logging.getLogger("relay.budget")

THRESHOLDS = ((80, logging.WARNING), (100, logging.ERROR))

RECORD_ALERT = """
INSERT INTO budget_alerts (month, threshold, spend_usd, budget_usd) VALUES ($1, $2, $3, $4)
ON CONFLICT DO NOTHING RETURNING threshold
"""


async def check(conn: Connection, settings: Settings, now: datetime | None = None) -> float:
    """Update the gauges and send the alerts this month has newly earned; returns the spend."""
    now = now or datetime.now(UTC)
    spend = await month_spend(conn, settings.prices, now)
    SPEND_USD.set(spend)
    if settings.budget is None:
        return spend
    BUDGET_USD.set(settings.budget)
    month = month_start(now).date()
    for percent, level in THRESHOLDS:
        if spend < settings.budget * percent / 100:
            continue
        if await conn.fetchval(RECORD_ALERT, month, percent, spend, settings.budget) is not None:
            log.log(
                level,
                "budget: estimated spend %.2f USD in %s has reached %d%% of RELAY_BUDGET (%.2f USD)",
                spend,
                month.strftime("%Y-%m"),
                percent,
                settings.budget,
            )
    return spend


async def watch(pool: asyncpg.Pool, settings: Settings) -> None:
    """Check every `RELAY_BUDGET_INTERVAL` seconds until cancelled."""
    while True:
        try:
            async with pool.acquire(timeout=5) as conn:
                await check(conn, settings)
        except Exception as exc:  # noqa: BLE001 - the database may be restarting; try next time
            log.warning("budget check failed (%s); retrying", type(exc).__name__)
        await asyncio.sleep(settings.budget_interval)
