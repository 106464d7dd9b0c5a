"""The dashboard shows archived copies: thumbnails from /files/… and each output's archive state."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Page, expect

from service.ops.simulate import lifecycle

from .browser import dashboard_url, launch_browser, new_page, save_screenshot
from .fileserver import FileServer, png, serving
from .support import RelayProcess, new_prediction_id, post_webhook, relay_env


@pytest.fixture(scope="module")
def origin() -> Iterator[FileServer]:
    yield from serving(FileServer())


@pytest.fixture(scope="module")
def archiving(
    postgres, origin: FileServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RelayProcess]:
    root = tmp_path_factory.mktemp("archive")
    env = relay_env(postgres.new_database(), RELAY_ARCHIVE=(root / "files").as_uri(),
                    RELAY_ARCHIVE_HOSTS=origin.origin, RELAY_DATA_DIR=str(root))  # fmt: skip
    with RelayProcess(env) as relay:
        yield relay


@pytest.fixture
def page(archiving: RelayProcess) -> Iterator[Page]:
    with launch_browser() as browser, new_page(browser) as opened:
        yield opened


def deliver(relay: RelayProcess, output: list[str]) -> str:
    prediction_id = new_prediction_id()
    with httpx.Client(base_url=relay.url, timeout=10) as http:
        for body in lifecycle(prediction_id):
            body = {**body, "output": output} if body.get("output") else body
            assert post_webhook(http, body).status_code == 200
    return prediction_id


def test_cards_show_the_stored_copy_and_archive_failures(
    page: Page, archiving: RelayProcess, origin: FileServer
) -> None:
    """A stored output is shown from /files/<sha256> marked "archived"; a 404 says why it failed."""
    good = [origin.add(f"/shots/{n}.png", png(300 + n, 96)) for n in range(2)]
    kept = deliver(archiving, good)
    gone = deliver(archiving, [origin.origin + "/shots/missing.png"])
    page.goto(dashboard_url(archiving))
    stored_card = page.locator(f'li.prediction[data-prediction-id="{kept}"]')
    expect(stored_card.locator(".archived")).to_have_count(2, timeout=20_000)
    sources = stored_card.locator("img").evaluate_all(
        "(images) => images.map((image) => image.getAttribute('src'))"
    )
    assert all(src.startswith("/files/") for src in sources), sources
    # The src switches to /files/… before the browser has fetched it: wait for the decoded images.
    page.wait_for_function(
        "(selector) => [...document.querySelectorAll(selector)]"
        ".every((image) => image.complete && image.naturalWidth === 96)",
        arg=f'li.prediction[data-prediction-id="{kept}"] img',
        timeout=20_000,
    )
    failed_card = page.locator(f'li.prediction[data-prediction-id="{gone}"]')
    expect(failed_card.locator(".archive-failed")).to_have_text(
        "archive failed: HTTP 404: the file is gone", timeout=20_000
    )
    save_screenshot(page, "archive-dashboard.png")
