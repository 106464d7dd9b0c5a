"""The dashboard's batch view in headless Chromium: progress, counts, thumbnails, cancel."""

from __future__ import annotations

from playwright.sync_api import expect

from .batch_support import submit, wait_for
from .browser import dashboard_url, image_server, launch_browser, new_page, save_screenshot
from .fake_replicate import api_client, api_env, relay_for
from .support import RelayProcess, free_port, relay_env


def test_the_batch_view_fills_in_live_and_the_admin_can_cancel(postgres, fake):
    """Reached from the main page; items end live with thumbnails; cancel ends a running batch."""
    fake.reset()
    dsn = postgres.new_database()  # before the browser: Playwright's loop then owns this thread
    with image_server() as images, relay_for(dsn, fake) as relay, api_client(relay) as api:
        fake.output_base, fake.hold = images, True
        live = submit(api, 6, 3)
        wait_for(lambda: len(fake.unfinished) == 3, what="3 running predictions")
        with launch_browser() as browser, new_page(browser, viewport={"width": 1100, "height": 900}) as page:
            page.goto(dashboard_url(relay, "/"))
            page.get_by_role("link", name="Batches").click()
            page.get_by_role("link", name=live["id"]).click()
            expect(page.locator("#batch-status")).to_contain_text("Status: running")
            expect(page.locator("#counts")).to_contain_text("pending: 3")
            expect(page.locator("#connection")).to_contain_text("Live")
            fake.hold = False  # the items now end, each event reaching the page live
            expect(page.locator("#progress-label")).to_have_text("6 of 6 items ended")
            expect(page.locator("#items img")).to_have_count(6)
            expect(page.locator("#connection")).to_have_text("Finished: every item has ended.")
            expect(page.locator("#batch-status")).to_contain_text("Status: succeeded")
            expect(page.locator("#counts li")).to_have_text(["✓ succeeded: 6"])
            expect(page.locator("#cancel")).to_be_hidden()
            page.wait_for_function(  # every thumbnail decoded, not only present
                "() => [...document.querySelectorAll('#items img')]"
                ".every((image) => image.complete && image.naturalWidth > 0)"
            )
            save_screenshot(page, "batch.png")

            fake.hold = True
            running = submit(api, 8, 2)
            page.goto(f"{relay.url}/b/{running['id']}")  # the token stays in sessionStorage
            expect(page.locator("#counts")).to_contain_text("pending: 6")
            page.get_by_role("button", name="Cancel batch").click()
            expect(page.locator("#batch-status")).to_contain_text("Status: canceled")
            expect(page.locator("#counts li")).to_have_text(["⊘ canceled: 8"])
            expect(page.locator("#cancel")).to_be_hidden()


def test_the_batch_view_keeps_reconnecting_until_relay_is_back(postgres, fake):
    """Relay restarted (a deploy) while a batch page is open, down longer than one retry: the page
    keeps trying and follows the batch to its end once Relay is back."""
    fake.reset()
    fake.hold = True
    dsn, port = postgres.new_database(), free_port()
    env = relay_env(dsn, **api_env(fake, port))
    with RelayProcess(env, port=port) as first, api_client(first) as api:
        batch = submit(api, 2, 2)
        wait_for(lambda: len(fake.unfinished) == 2, what="2 running predictions")
        with launch_browser() as browser, new_page(browser) as page:
            page.goto(dashboard_url(first, f"/b/{batch['id']}"))
            expect(page.locator("#connection")).to_contain_text("Live")
            first.stop()
            expect(page.locator("#connection")).to_contain_text("reconnecting")
            page.wait_for_timeout(4000)  # a retry (every 2 s at first) fails meanwhile
            with RelayProcess(env, port=port):
                fake.hold = False
                expect(page.locator("#connection")).to_have_text("Finished: every item has ended.")
                expect(page.locator("#batch-status")).to_contain_text("Status: succeeded")
