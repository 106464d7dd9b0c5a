"""The dashboard in headless Chromium against real `relay serve` processes, and its admin read."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from service.ops.simulate import MODEL, lifecycle

from .browser import (
    TIMEOUT_MS,
    dashboard_url,
    image_server,
    launch_browser,
    new_page,
    relay_pair,
    save_screenshot,
)
from .support import (
    ADMIN_TOKEN,
    ROOT,
    WEBHOOK_SECRET,
    RelayProcess,
    admin_headers,
    deliver_lifecycle,
    new_prediction_id,
    post_webhook,
    query,
    relay_env,
)

PHONE = {"width": 390, "height": 844}
LINK = re.compile(r'(?:src|href)="([^"]*)"')


@pytest.fixture(scope="module")
def relays(postgres) -> Iterator[tuple[RelayProcess, RelayProcess]]:
    with relay_pair(postgres) as pair:
        yield pair


@pytest.fixture(scope="module")
def served(relays) -> RelayProcess:
    return relays[0]


@pytest.fixture(scope="module")
def spend_dsn(postgres) -> str:
    """A database of its own for the budget test, made before the browser starts (Playwright's
    event loop then runs in this thread, and the fixtures' asyncio.run cannot)."""
    return postgres.new_database()


@pytest.fixture(scope="module")
def cached_dsn(postgres) -> str:
    """A database where the prediction cache answered twice this month, written before the browser
    starts (as spend_dsn, for the same reason)."""
    dsn = postgres.new_database()
    query(
        dsn,
        "INSERT INTO cache_answers (scope, prediction_id, model, predict_time)"
        " VALUES ('admin', 'p1', $1, 4.0), ('admin', 'p2', $1, 2.5)",
        MODEL,
    )
    return dsn


@pytest.fixture(scope="module")
def browser(relays, spend_dsn, cached_dsn) -> Iterator[Browser]:
    with launch_browser() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def images() -> Iterator[str]:
    with image_server() as url:
        yield url


@pytest.fixture
def page(browser) -> Iterator[Page]:
    with new_page(browser) as opened:
        yield opened


@pytest.fixture
def http(served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        yield client


def card(page: Page, prediction_id: str):
    return page.locator(f'li.prediction[data-prediction-id="{prediction_id}"]')


def with_output(bodies: list[dict], url: str) -> list[dict]:
    return [{**body, "output": [url]} if body.get("output") else body for body in bodies]


def open_live(page: Page, served: RelayProcess, path: str = "/") -> None:
    page.goto(dashboard_url(served, path))
    expect(page.locator("#connection")).to_contain_text("Live")


def wait_until(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def deliver_priced(http: httpx.Client, predict_time: float) -> str:
    """A succeeded prediction of MODEL whose final delivery reports `predict_time` seconds."""
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    bodies[-1] = {**bodies[-1], "metrics": {"predict_time": predict_time}}
    for body in bodies:
        assert post_webhook(http, body).status_code == 200
    return prediction_id


def test_dashboard_follows_a_prediction_live(page, served, http, images):
    open_live(page, served)
    assert "token" not in page.url  # taken out of the address bar at once
    prediction_id = new_prediction_id()
    bodies = with_output(lifecycle(prediction_id), f"{images}/{prediction_id}/out-0.png")

    post_webhook(http, bodies[0])
    expect(card(page, prediction_id).locator(".status-text")).to_have_text("starting")

    post_webhook(http, bodies[3])  # logs at 41/50 steps
    progress = card(page, prediction_id).locator("progress")
    expect(progress).to_have_attribute("value", "82")
    expect(card(page, prediction_id).locator(".progress-text")).to_have_text("82% (41/50)")

    for body in bodies[4:]:
        post_webhook(http, body)
    expect(card(page, prediction_id).locator(".status-text")).to_have_text("succeeded")
    expect(progress).to_have_attribute("value", "100")
    timeline = card(page, prediction_id).locator(".timeline li")
    expect(timeline).to_have_count(3)
    expect(timeline.nth(1)).to_contain_text("processing ×2")
    thumbnail = card(page, prediction_id).get_by_role("img", name=f"Output 1 of {prediction_id}")
    expect(thumbnail).to_have_attribute("src", f"{images}/{prediction_id}/out-0.png")
    page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=thumbnail.element_handle())

    failed = new_prediction_id()
    deliver_lifecycle(http, failed, "failed")
    expect(card(page, failed).locator(".status-text")).to_have_text("failed")
    expect(card(page, failed).locator(".error")).to_have_text("Error: CUDA out of memory")
    expect(card(page, failed)).to_be_visible()
    save_screenshot(page, "dashboard.png")


def simulate_command(relay: RelayProcess, report: Path, *options: str) -> list[str]:
    """`relay simulate` of six predictions, half of them failing or canceled, into `relay`."""
    command = [sys.executable, "-m", "service", "simulate", "--url", f"{relay.url}/webhooks/replicate"]
    command += [
        "--secret",
        WEBHOOK_SECRET,
        "--predictions",
        "6",
        "--failures",
        "0.5",
        "--report",
        str(report),
    ]
    return [*command, *options]


def final_statuses(report: Path) -> dict[str, str]:
    final = json.loads(report.read_text())["final_status"]
    assert len(final) == 6 and len(set(final.values())) > 1
    return final


def shown_timeline(page: Page, prediction_id: str) -> list[str]:
    """The card's timeline runs as shown, e.g. ["starting", "processing ×4", "succeeded"]."""
    runs = card(page, prediction_id).locator(".timeline li")
    return runs.evaluate_all("runs => runs.map(run => run.firstChild.textContent.trim())")


def log_position(http: httpx.Client) -> int:
    return http.get("/admin/predictions", params={"limit": 1}, headers=admin_headers()).json()["seq"]


def logged_timelines(http: httpx.Client, prediction_ids: list[str]) -> dict[str, list[str]]:
    """The same runs as the log holds them (GET /admin/predictions groups the events)."""
    answer = http.get("/admin/predictions", params={"limit": 50}, headers=admin_headers()).json()
    timelines = {}
    for prediction in answer["predictions"]:
        if prediction["id"] in prediction_ids:
            runs = prediction["timeline"]
            timelines[prediction["id"]] = [
                r["status"] + (f" ×{r['events']}" if r["events"] > 1 else "") for r in runs
            ]
    return timelines


def test_simulated_run_reaches_final_statuses_and_survives_a_reload(page, served, tmp_path):
    open_live(page, served)
    report = tmp_path / "report.json"
    command = simulate_command(served, report, "--seed", "7")
    subprocess.run(command, env=served.env, cwd=ROOT, check=True, capture_output=True, timeout=60)
    final = final_statuses(report)

    for prediction_id, status in final.items():
        expect(card(page, prediction_id).locator(".status-text")).to_have_text(status)
        if status == "succeeded":  # the last lifecycle body: 50/50 steps and one output image
            expect(card(page, prediction_id).locator("progress")).to_have_attribute("value", "100")
            (output,) = lifecycle(prediction_id)[-1]["output"]
            thumbnail = card(page, prediction_id).get_by_role("img", name=f"Output 1 of {prediction_id}")
            expect(thumbnail).to_have_attribute("src", output)  # replicate.delivery: not loaded offline
    page.reload()  # now the same statuses come from GET /admin/predictions
    expect(page.locator("#connection")).to_contain_text("Live")
    for prediction_id, status in final.items():
        expect(card(page, prediction_id).locator(".status-text")).to_have_text(status)
        expect(card(page, prediction_id).locator(".timeline li").last).to_contain_text(status)


def test_list_page_follows_a_simulated_run_across_a_restart(page, relays, tmp_path):
    """A restart under the list page mid-run: each card ends as its log, every event shown once."""
    served, receiver = relays
    open_live(page, served)
    cards_before = page.locator("li.prediction").count()
    report = tmp_path / "report.json"
    command = simulate_command(receiver, report, "--seed", "11", "--rate", "6")
    with (
        subprocess.Popen(command, env=served.env, cwd=ROOT, stdout=subprocess.DEVNULL) as simulate,
        httpx.Client(base_url=receiver.url, timeout=30) as http,
    ):
        expect(page.locator("li.prediction")).not_to_have_count(cards_before)  # the run has begun
        served.stop()
        assert simulate.poll() is None  # the run goes on, into the other instance
        expect(page.locator("#connection")).to_contain_text("reconnecting")
        at_stop = log_position(http)
        wait_until(lambda: log_position(http) > at_stop)  # events committed while the page's server is down
        served.start()
        assert simulate.wait(timeout=60) == 0
        final = final_statuses(report)

        for prediction_id, status in final.items():
            expect(card(page, prediction_id).locator(".status-text")).to_have_text(status)
        logged = logged_timelines(http, list(final))
    assert sorted(logged) == sorted(final)
    for prediction_id, runs in logged.items():
        assert runs[-1].startswith(final[prediction_id])
        assert shown_timeline(page, prediction_id) == runs, prediction_id


def test_missing_and_wrong_tokens_are_explained(page, served):
    page.goto(served.url + "/")
    expect(page.locator("#token-message")).to_contain_text("No admin token")
    expect(page.locator("#content")).to_be_hidden()

    page.goto(dashboard_url(served, token="not-the-admin-token"))
    page.reload()  # a hash change alone does not reload the page
    expect(page.locator("#token-message")).to_contain_text("refused (403 FORBIDDEN)")

    page.get_by_label("Admin token (RELAY_ADMIN_TOKEN)").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Use this token").click()
    expect(page.locator("#connection")).to_contain_text("Live")
    expect(page.locator("#token-problem")).to_be_hidden()


def test_prediction_page_resumes_after_a_restart_with_every_event_once(browser, relays):
    """A restart of the server under the page loses no event and repeats none."""
    served, receiver = relays
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    with new_page(browser) as page, httpx.Client(base_url=receiver.url, timeout=30) as http:
        open_live(page, served, f"/p/{prediction_id}")
        for body in bodies[:3]:
            post_webhook(http, body)
        rows = page.locator("#events tbody tr")
        expect(rows).to_have_count(3)

        served.stop()
        expect(page.locator("#connection")).to_contain_text("reconnecting")
        for body in bodies[3:]:  # delivered while the page's server is down
            post_webhook(http, body)
        served.start()

        expect(page.locator("#connection")).to_have_text("Finished: succeeded.")
        log = http.get(f"/predictions/{prediction_id}/events", headers=admin_headers()).json()["events"]
        shown = [int(seq) for seq in rows.evaluate_all("rows => rows.map(row => row.dataset.seq)")]
        assert shown == [event["seq"] for event in log] and len(log) == len(bodies)
        expect(page.locator("#logs")).to_contain_text("100%|")


def test_dashboard_fits_a_phone_screen(browser, served, http):
    deliver_lifecycle(http, new_prediction_id(), "failed")
    with new_page(browser, viewport=PHONE) as page:
        open_live(page, served)
        expect(page.locator("li.prediction").first).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        save_screenshot(page, "dashboard-phone.png")


def test_recent_predictions_need_the_admin_token(http):
    assert http.get("/admin/predictions").status_code == 401
    refused = http.get("/admin/predictions", headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "FORBIDDEN"
    bad = http.get("/admin/predictions", params={"limit": "0"}, headers=admin_headers())
    assert bad.status_code == 400 and "limit" in bad.json()["error"]["message"]


def test_recent_predictions_give_state_timeline_and_snapshot_seq(http):
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    for body in [bodies[0], bodies[1], bodies[-1], bodies[2]]:  # a late processing after the end
        post_webhook(http, body)
    answer = http.get("/admin/predictions", params={"limit": 1}, headers=admin_headers()).json()
    (prediction,) = answer["predictions"]
    assert prediction["id"] == prediction_id and prediction["status"] == "succeeded"
    assert prediction["model"] == "qwen/qwen-image-edit-plus" and prediction["output"]
    runs = [(run["status"], run["events"]) for run in prediction["timeline"]]
    assert runs == [("starting", 1), ("processing", 1), ("succeeded", 1), ("processing", 1)]
    assert answer["seq"] == prediction["last_seq"]


def test_pages_and_client_are_served_from_relay_itself(http):
    page = http.get(f"/p/{new_prediction_id()}")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    links = LINK.findall(page.text)
    assert {"/relay.js", "/static/dashboard.js", "/static/dashboard.css"} <= set(links)  # found them
    assert all(link.startswith("/") and not link.startswith("//") for link in links)
    client = http.get("/relay.js")
    assert client.status_code == 200 and "javascript" in client.headers["content-type"]
    assert "function subscribe(" in client.text


def test_spend_this_month_is_shown_against_the_budget(browser, spend_dsn):
    """With RELAY_BUDGET the header shows the month's spend, updated as predictions end; without, nothing."""
    env = relay_env(spend_dsn, RELAY_PRICES=f"{MODEL}=0.5", RELAY_BUDGET="5")
    with RelayProcess(env) as relay, new_page(browser) as page, httpx.Client(base_url=relay.url) as http:
        open_live(page, relay)
        spend, text = page.locator("#spend"), page.locator("#spend-text")
        meter = page.get_by_role("meter", name="Spend this month")
        expect(text).to_have_text("Spend this month: $0.00 of $5.00 (0%)")

        deliver_priced(http, 8.0)  # 8 s at $0.50 a second
        expect(text).to_have_text("Spend this month: $4.00 of $5.00 (80%)", timeout=TIMEOUT_MS)
        expect(meter).to_have_js_property("value", 0.8)
        deliver_priced(http, 4.0)
        expect(text).to_have_text("Spend this month: $6.00 of $5.00 (120%, over budget)", timeout=TIMEOUT_MS)
        expect(meter).to_have_js_property("value", 1)
        save_screenshot(page, "dashboard-spend.png")

        relay.stop()
        relay.env = {name: value for name, value in env.items() if name != "RELAY_BUDGET"}
        relay.start()
        expect(page.locator("#connection")).to_contain_text("Live")  # the same page, reconnected
        ended = deliver_priced(http, 1.0)
        expect(card(page, ended).locator(".status-text")).to_have_text("succeeded")
        expect(spend).to_be_hidden(timeout=TIMEOUT_MS)


def test_cached_answers_this_month_are_shown_with_what_they_saved(browser, cached_dsn):
    """The header says how often the prediction cache answered this month, and the time and cost saved."""
    env = relay_env(cached_dsn, RELAY_PRICES=f"{MODEL}=0.5")
    with RelayProcess(env) as relay, new_page(browser) as page:
        open_live(page, relay)
        expect(page.locator("#cached")).to_have_text(
            "Cached answers this month: 2 (saved 6.5 s, $3.25)", timeout=TIMEOUT_MS
        )
        expect(page.locator("#spend")).to_be_hidden()  # no RELAY_BUDGET: no spend meter
