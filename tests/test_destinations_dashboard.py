"""The dashboard's destinations panel in headless Chromium: lag, last error, and the retry button."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from .browser import dashboard_url, launch_browser, new_page, save_screenshot
from .receiver import RECEIVER_SECRET, Receiver
from .support import RelayProcess, admin_headers, deliver_lifecycle, new_prediction_id, relay_env


@pytest.fixture(scope="module")
def relay(postgres) -> Iterator[RelayProcess]:
    with RelayProcess(relay_env(postgres.new_database(), RELAY_RETRY_SCHEDULE="0,0.2")) as process:
        yield process


@pytest.fixture(scope="module")
def browser(relay) -> Iterator[Browser]:
    with launch_browser() as chromium:
        yield chromium


@pytest.fixture
def page(browser) -> Iterator[Page]:
    with new_page(browser) as opened:
        yield opened


def test_the_panel_shows_a_failing_destination_and_its_retry_button_delivers(relay, page, receiver: Receiver):
    """A receiver that refuses everything: the panel shows the error and the exhausted events;
    once it accepts again, the Retry button sends them and the lag drains to 0."""
    receiver.rule = lambda _id, _body: (500, {})
    with httpx.Client(base_url=relay.url, headers=admin_headers(), timeout=30) as admin:
        body = {"url": receiver.url + "/hook", "secret": RECEIVER_SECRET}
        destination = admin.post("/admin/destinations", json=body).json()
        seqs = deliver_lifecycle(admin, new_prediction_id())
    page.goto(dashboard_url(relay))
    row = page.locator(f'#destinations-table tr[data-id="{destination["id"]}"]')
    expect(row.locator(".destination-exhausted")).to_have_text(str(len(seqs)))
    expect(row.locator(".destination-error")).to_contain_text("HTTP 500")
    expect(row.locator(".destination-lag")).to_contain_text("0 events")
    expect(row.locator(".destination-state")).to_have_text("exhausted")
    save_screenshot(page, "destinations-failing.png")
    receiver.rule = None
    row.get_by_role("button", name="Retry").click()
    expect(row.locator(".destination-exhausted")).to_have_text("0")
    expect(row.locator(".destination-state")).to_have_text("ok")
    expect(row.get_by_role("button", name="Retry")).to_be_disabled()
    assert sorted(receiver.seqs.values()) == seqs
