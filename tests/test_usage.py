"""Usage and cost from the log: each prediction once, by its terminal state; exact totals."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from service.ops.simulate import MODEL, lifecycle
from service.usage import report as usage

from .support import (
    PRICE,
    VERSION_ONLY,
    Log,
    Postgres,
    RelayProcess,
    admin_headers,
    bodies,
    new_prediction_id,
    new_webhook_id,
    post_webhook,
    relay_cli,
    relay_env,
)

UNPRICED = "acme/unpriced-model"
PRICES = f"{MODEL}={PRICE} {VERSION_ONLY}=0.0005"


@pytest.fixture(scope="module")
def usage_relay(postgres: Postgres) -> Iterator[RelayProcess]:
    with RelayProcess(relay_env(postgres.new_database(), RELAY_PRICES=PRICES)) as process:
        yield process


@pytest.fixture
def admin(usage_relay: RelayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=usage_relay.url, timeout=30, headers=admin_headers()) as http:
        yield http


def usage_of(admin: httpx.Client, since: str, until: str, group: str = "model") -> dict:
    response = admin.get("/admin/usage", params={"since": since, "until": until, "group": group})
    assert response.status_code == 200, response.text
    return response.json()


def by_key(report: dict) -> dict:
    return {line[report["group"]]: line for line in report["groups"]}


def test_totals_are_exact_with_duplicates_reordering_and_reconcile_events(usage_relay, admin):
    """Each prediction counts once, by its first terminal state, whatever else arrives."""
    log = Log(usage_relay.env["DATABASE_URL"])
    t = datetime(2021, 3, 10, tzinfo=UTC)
    expected_seconds = 0.0
    for i in range(6):  # plain successes, every delivery sent twice (Replicate retries)
        for body in bodies("succeeded", predict_time=1.0 + i):
            webhook_id = log.add(body, t)
            log.add(body, t, webhook_id=webhook_id)
        expected_seconds += 1.0 + i
    reordered = bodies("failed", predict_time=3.0)  # terminal lands before the progress events
    for body in [reordered[0], reordered[-1], *reordered[1:-1]]:
        log.add(body, t)
    lost = bodies("succeeded", predict_time=5.0)  # completed webhook lost: reconcile finds the end
    for body in lost[:-1]:
        log.add(body, t)
    log.add(lost[-1], t + timedelta(minutes=5), source="reconcile")
    both = bodies("canceled", predict_time=2.0)  # webhook end, then reconcile says the same
    for body in both:
        log.add(body, t)
    log.add(both[-1], t + timedelta(minutes=5), source="reconcile")
    late = bodies("succeeded", predict_time=7.0)  # a later terminal of another kind is ignored
    for body in late:
        log.add(body, t)
    log.add({**late[-1], "status": "aborted", "metrics": {"predict_time": 99.0}}, t, source="reconcile")
    aborted = bodies("aborted")  # ended before it ran (e.g. its deadline passed): no predict_time
    for body in [aborted[0], {**aborted[-1], "started_at": None, "logs": "", "metrics": {}}]:
        log.add(body, t)
    open_one = bodies("succeeded")[:3]  # still running: started, no terminal yet
    for body in open_one:
        log.add(body, t)
    log.commit()

    report = usage_of(admin, "2021-03-01", "2021-04-01")
    line = by_key(report)[MODEL]
    assert line["started"] == 12 and line["running"] == 1
    assert (line["succeeded"], line["failed"], line["canceled"], line["aborted"]) == (8, 1, 1, 1)
    seconds = expected_seconds + 3.0 + 5.0 + 2.0 + 7.0
    assert line["predict_time"] == pytest.approx(seconds)
    assert line["cost"] == pytest.approx(seconds * PRICE)
    # Of 1,2,3,4,5,6 and 3,5,2,7 (the aborted and the open one have none): sorted
    # 1,2,2,3,3,4,5,5,6,7; p50 halfway between 3 and 4, p95 at 0.95 × 9 = 8.55 → 6 + 0.55 × (7 - 6).
    assert line["predict_time_p50"] == pytest.approx(3.5)
    assert line["predict_time_p95"] == pytest.approx(6.55)
    assert report["total"]["started"] == 12 and report["total"]["cost"] == pytest.approx(seconds * PRICE)


def test_month_boundaries_split_by_the_terminal_time(usage_relay, admin):
    log = Log(usage_relay.env["DATABASE_URL"])
    last_moment = datetime(2021, 1, 31, 23, 59, 59, 999000, tzinfo=UTC)
    february = datetime(2021, 2, 1, tzinfo=UTC)
    january_end = bodies("succeeded", predict_time=1.0)
    for body in january_end:
        log.add(body, last_moment)
    crossing = bodies("succeeded", predict_time=10.0)  # starts in January, ends in February
    for body in crossing[:-1]:
        log.add(body, last_moment - timedelta(minutes=1))
    log.add(crossing[-1], february)
    open_in_january = bodies("succeeded")[:2]
    for body in open_in_january:
        log.add(body, last_moment - timedelta(hours=1))
    log.commit()

    january = by_key(usage_of(admin, "2021-01-01", "2021-02-01"))[MODEL]
    assert (january["started"], january["succeeded"], january["running"]) == (2, 1, 1)
    assert january["predict_time"] == pytest.approx(1.0)
    feb = by_key(usage_of(admin, "2021-02-01T00:00:00Z", "2021-03-01T00:00:00Z"))[MODEL]
    assert (feb["started"], feb["succeeded"], feb["running"]) == (1, 1, 0)
    assert feb["predict_time"] == pytest.approx(10.0)
    days = by_key(usage_of(admin, "2021-01-31", "2021-02-02", group="day"))
    assert sorted(days) == ["2021-01-31", "2021-02-01"]
    assert days["2021-02-01"]["cost"] == pytest.approx(10.0 * PRICE)


def test_a_model_without_a_price_costs_null_never_a_guess(usage_relay, admin):
    log = Log(usage_relay.env["DATABASE_URL"])
    t = datetime(2021, 6, 15, 12, tzinfo=UTC)
    for model, seconds in [(MODEL, 2.0), (UNPRICED, 3.0), (None, 4.0)]:
        for body in bodies("succeeded", model=model, predict_time=seconds):
            log.add(body, t)
    log.commit()
    report = usage_of(admin, "2021-06-01", "2021-07-01")
    lines = by_key(report)
    assert lines[UNPRICED]["predict_time"] == pytest.approx(3.0) and lines[UNPRICED]["cost"] is None
    assert lines[VERSION_ONLY]["cost"] == pytest.approx(4.0 * 0.0005)  # the version is the model
    assert lines[MODEL]["cost"] == pytest.approx(2.0 * PRICE)
    assert report["total"]["cost"] is None and report["total"]["predict_time"] == pytest.approx(9.0)
    day = usage_of(admin, "2021-06-01", "2021-07-01", group="day")["groups"]
    assert [(d["day"], d["started"], d["cost"]) for d in day] == [("2021-06-15", 3, None)]


def test_webhooks_over_http_count_once_in_the_default_window(usage_relay, admin):
    """The default window is this UTC month up to now; a retried delivery adds nothing."""
    prediction = lifecycle(new_prediction_id())
    with httpx.Client(base_url=usage_relay.url, timeout=30) as client:
        for body in prediction:
            webhook_id = new_webhook_id()
            assert post_webhook(client, body, webhook_id=webhook_id).status_code == 200
        assert post_webhook(client, prediction[-1], webhook_id=webhook_id).json()["duplicate"] is True
    report = admin.get("/admin/usage").json()
    assert report["since"].startswith(datetime.now(UTC).strftime("%Y-%m-01T00:00:00"))
    line = by_key(report)[MODEL]
    assert (line["started"], line["succeeded"]) == (1, 1)
    assert line["predict_time"] == pytest.approx(4.61) and line["cost"] == pytest.approx(4.61 * PRICE)
    this_month = report["this_month"]
    assert this_month["spend"] == pytest.approx(4.61 * PRICE) and this_month["budget"] is None


@pytest.mark.parametrize(
    ("params", "mentions"),
    [
        ({"since": "yesterday"}, "since"),
        ({"until": "2021-13-01"}, "until"),
        ({"group": "week"}, "group"),
        ({"since": "2021-02-01", "until": "2021-01-01"}, "before"),
    ],
)
def test_bad_usage_parameters_are_400_with_one_clear_message(admin, params, mentions):
    response = admin.get("/admin/usage", params=params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST" and mentions in error["message"]


def test_usage_needs_the_admin_token(usage_relay):
    assert httpx.get(usage_relay.url + "/admin/usage").status_code == 401
    wrong = httpx.get(usage_relay.url + "/admin/usage", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403


def test_relay_usage_prints_the_same_report_as_the_api(usage_relay, admin):
    env = usage_relay.env
    window = ["--since", "2021-06-01", "--until", "2021-07-01"]
    result = relay_cli("usage", *window, "--json", env=env)
    assert result.returncode == 0, result.stderr
    from_api = usage_of(admin, "2021-06-01", "2021-07-01")
    del from_api["this_month"]  # the API adds this month's spend against the budget
    assert json.loads(result.stdout) == from_api
    table = relay_cli("usage", *window, env=env)
    assert table.returncode == 0
    total = table.stdout.splitlines()[-1].split()
    assert total[0] == "total" and total[1] == "3" and total[-1] == "-"  # an unpriced model: no total


@pytest.mark.parametrize(
    ("args", "extra", "mentions"),
    [
        (["--since", "last week"], {}, "--since must be an ISO 8601 date"),
        ([], {"RELAY_PRICES": "qwen/qwen-image-edit-plus"}, "RELAY_PRICES entry"),
        ([], {"RELAY_PRICES": "qwen/qwen-image-edit-plus=cheap"}, "RELAY_PRICES price"),
        ([], {"RELAY_BUDGET": "-5"}, "RELAY_BUDGET must be a number"),
        ([], {"RELAY_BUDGET": "0"}, "RELAY_BUDGET must be a number of US dollars (more than 0 a month"),
    ],
)
def test_relay_usage_bad_input_exits_2_with_one_line(usage_relay, args, extra, mentions):
    result = relay_cli("usage", *args, env={**usage_relay.env, **extra})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and mentions in result.stderr and "Traceback" not in result.stderr


def test_relay_serve_refuses_to_start_with_malformed_prices(usage_relay):
    env = {**usage_relay.env, "RELAY_PRICES": f"{MODEL}=0.001 =0.002"}
    result = relay_cli("serve", "--port", "0", env=env)
    assert result.returncode == 2 and "RELAY_PRICES entry '=0.002'" in result.stderr


def test_the_usage_query_uses_the_usage_index(postgres):
    """The plan for a narrow window reads the predictions_usage_at index, not the whole table."""
    dsn = postgres.new_database()

    async def plan() -> str:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "INSERT INTO predictions (prediction_id, status, status_rank, state_seq, first_seq,"
                " last_seq, event_count, model, predict_time, first_received_at, updated_at)"
                " SELECT 'p' || i, 'succeeded', 3, i, i, i, 6, 'm' || (i % 7), i % 13,"
                "  t, t FROM generate_series(1, 20000) AS i,"
                "  LATERAL (SELECT timestamptz '2024-01-01' + i * interval '1 minute' AS t) AS at"
            )
            await conn.execute("ANALYZE predictions")
            since = datetime(2024, 1, 5, tzinfo=UTC)
            rows = await conn.fetch("EXPLAIN " + usage.usage_sql("day"), since, since + timedelta(days=1))
            return "\n".join(r[0] for r in rows)
        finally:
            await conn.close()

    text = asyncio.run(plan())
    print(text)
    assert "predictions_usage_at" in text and "Seq Scan" not in text
