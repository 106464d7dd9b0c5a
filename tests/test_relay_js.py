"""relay.js, the browser client, in headless Chromium against real `relay serve` processes."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.sync_api import Page

from service.core.auth import mint_token
from service.ops.simulate import lifecycle, progress_line

from .browser import launch_browser, new_page, relay_pair
from .support import (
    SUBSCRIBE_KEY,
    RelayProcess,
    admin_headers,
    deliver_lifecycle,
    new_prediction_id,
    post_webhook,
)

MIN_DELAY, MAX_DELAY = 50, 800  # ms, for the backoff test

# Logs as Replicate delivers them for a finished qwen-image-edit-plus prediction.
REPLICATE_LOGS = (
    "Using seed: 1423\n 10%|█         | 5/50 [00:01<00:04, 11.2it/s]\n"
    " 46%|████      | 23/50 [00:02<00:03, 11.2it/s]\n 82%|████████  | 41/50 [00:03<00:02, 11.2it/s]\n"
    "100%|██████████| 50/50 [00:04<00:00, 11.3it/s]\n"
)

# Records every callback of one subscription in `window.got` (`states`: [name, detail] pairs).
SUBSCRIBE = """([id, options]) => {
  window.got = {events: [], statuses: [], done: [], errors: [], states: []};
  window.sub = Relay.subscribe(id, Object.assign({minDelay: 100}, options, {
    onEvent: (event) => got.events.push(event.seq),
    onStatus: (status, event) => got.statuses.push([status, event.seq]),
    onDone: (event) => got.done.push(event && event.seq),
    onError: (error) => got.errors.push(error),
    onConnection: (state, detail) => got.states.push([state, detail]),
  }));
}"""


@pytest.fixture(scope="module")
def relays(postgres) -> Iterator[tuple[RelayProcess, RelayProcess]]:
    with relay_pair(postgres) as pair:
        yield pair


@pytest.fixture(scope="module")
def browser(relays):
    with launch_browser() as chromium:
        yield chromium


@pytest.fixture
def page(browser, relays) -> Iterator[Page]:
    """A page of the served relay's origin with relay.js loaded, as a frontend would have it."""
    with new_page(browser) as opened:
        opened.goto(relays[0].url + "/healthz")
        opened.add_script_tag(url=relays[0].url + "/relay.js")
        yield opened


@pytest.fixture
def receiver(relays) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=relays[1].url, timeout=30) as client:
        yield client


def subscribe(page: Page, prediction_id: str, **options) -> None:
    options.setdefault("token", mint_token(SUBSCRIBE_KEY, prediction_id))
    page.evaluate(SUBSCRIBE, [prediction_id, options])


def got(page: Page) -> dict:
    return page.evaluate("got")


def states(page: Page) -> list[str]:
    return [name for name, _ in got(page)["states"]]


def wait_for_state(page: Page, name: str, count: int = 1) -> None:
    page.wait_for_function(
        "([name, count]) => got.states.filter(([s]) => s === name).length >= count", arg=[name, count]
    )


def socket_afters(urls: list[str]) -> list[int]:
    """The `after=` of each WebSocket the page opened."""
    return [int(parse_qs(urlsplit(url).query)["after"][0]) for url in urls]


def log_seqs(client: httpx.Client, prediction_id: str) -> list[int]:
    events = client.get(f"/predictions/{prediction_id}/events", headers=admin_headers()).json()["events"]
    return [event["seq"] for event in events]


def test_resume_after_a_server_restart_yields_exactly_the_log(page, relays, receiver):
    """Events committed while the client's server was down arrive after it returns: none lost, none twice."""
    served = relays[0]
    prediction_id = new_prediction_id()
    bodies = lifecycle(prediction_id)
    sockets: list[str] = []
    page.on("websocket", lambda socket: sockets.append(socket.url))
    subscribe(page, prediction_id)
    for body in bodies[:3]:
        post_webhook(receiver, body)
    page.wait_for_function("() => got.events.length === 3")

    served.stop()
    wait_for_state(page, "reconnecting")
    for body in bodies[3:]:
        post_webhook(receiver, body)
    served.start()

    page.wait_for_function("() => got.done.length === 1")
    seqs = log_seqs(receiver, prediction_id)
    seen = got(page)
    assert len(seqs) == len(bodies) and seen["events"] == seqs
    assert seen["statuses"] == [["starting", seqs[0]], ["processing", seqs[1]], ["succeeded", seqs[-1]]]
    assert seen["done"] == [seqs[-1]]
    assert states(page).count("open") == 2 and seen["errors"] == []
    assert page.evaluate("sub.lastSeq") == seqs[-1]
    first, *reconnects = socket_afters(sockets)  # asked the server for the missing events only
    assert first == 0 and reconnects and set(reconnects) == {seqs[2]}


def test_reconnect_delays_grow_while_down_and_reset_after_an_open(page, relays):
    """Backoff: each retry may wait twice as long (with jitter), and it starts over after an open."""
    served = relays[0]
    served.stop()
    try:
        subscribe(page, new_prediction_id(), minDelay=MIN_DELAY, maxDelay=MAX_DELAY)
        wait_for_state(page, "reconnecting", count=6)
        served.start()
        wait_for_state(page, "open")
        retries = states(page).count("reconnecting")
        served.stop()  # the open socket is dropped: the count of failed attempts starts over
        wait_for_state(page, "reconnecting", count=retries + 1)
    finally:
        served.start()
    page.evaluate("sub.close()")
    down, *after_open = split_at_open(got(page))
    caps = [min(MAX_DELAY, MIN_DELAY * 2**attempt) for attempt in range(len(down))]
    assert all(cap / 2 <= delay <= cap for delay, cap in zip(down, caps, strict=True)), (down, caps)
    assert down[:5] == sorted(down[:5]) and down[4] > down[0] * 4  # growing up to the cap
    assert after_open and MIN_DELAY / 2 <= after_open[0][0] <= MIN_DELAY


def split_at_open(seen: dict) -> list[list[float]]:
    """The scheduled reconnect delays, one list per stretch between successful opens."""
    stretches: list[list[float]] = [[]]
    for name, detail in seen["states"]:
        if name == "open":
            stretches.append([])
        elif name == "reconnecting":
            stretches[-1].append(detail["delay"])
    return stretches


def test_after_resumes_from_a_saved_seq(page, receiver):
    prediction_id = new_prediction_id()
    seqs = deliver_lifecycle(receiver, prediction_id)
    subscribe(page, prediction_id, after=seqs[2])
    page.wait_for_function("() => got.done.length === 1")
    assert got(page)["events"] == seqs[3:] and got(page)["done"] == [seqs[-1]]

    subscribe(page, prediction_id, after=seqs[-1])  # nothing left: the stream just ends
    page.wait_for_function("() => got.done.length === 1")
    assert got(page)["events"] == [] and got(page)["done"] == [None]


@pytest.mark.parametrize(
    ("token", "status", "code"),
    [("", 401, "UNAUTHORIZED"), ("wrong", 403, "FORBIDDEN"), ("other", 403, "FORBIDDEN")],
)
def test_refused_token_is_reported_once_and_never_retried(page, receiver, token, status, code):
    prediction_id = new_prediction_id()
    deliver_lifecycle(receiver, prediction_id)
    if token == "other":
        token = mint_token(SUBSCRIBE_KEY, new_prediction_id())
    subscribe(page, prediction_id, token=token)
    page.wait_for_function("() => got.errors.length === 1")
    page.wait_for_timeout(500)  # long enough for retries at minDelay=100 ms, were there any
    seen = got(page)
    (error,) = seen["errors"]
    assert error["status"] == status and error["code"] == code and error["message"]
    assert states(page).count("connecting") == 1 and seen["events"] == [] and seen["done"] == []


def test_parse_progress_reads_the_last_tqdm_line(page):
    parse = "logs => Relay.parseProgress(logs)"
    assert page.evaluate(parse, " 45%|████▌     | 45/100 [00:04<00:05, 11.2it/s]") == {
        "percent": 45,
        "current": 45,
        "total": 100,
    }
    assert page.evaluate(parse, REPLICATE_LOGS) == {"percent": 100, "current": 50, "total": 50}
    long_logs = "Using seed: 1\n" + "\n".join(progress_line(step) for step in range(1, 51)) * 40
    assert page.evaluate(parse, long_logs)["current"] == 50
    assert page.evaluate(parse, "Using seed: 1\nloading weights\n") is None
    assert page.evaluate(parse, None) is None


def test_stored_copies_point_at_relay_from_a_page_of_another_origin(page, relays):
    """`fileUrl`/`outputUrl` with `base` (as `watchArchive` takes it) name the copy on Relay's
    origin, not on the page's; without `base` the path stays relative (the same-origin dashboard)."""
    other = relays[1].url  # Relay, as seen from a frontend served by another origin
    item = {"url": "https://replicate.delivery/a/out.png", "status": "stored", "file": "/files/ab12"}
    urls = page.evaluate(
        """([item, base]) => [
          Relay.fileUrl(item, "t k", base + "/"),
          Relay.outputUrl(item.url, [item], "t", base),
          Relay.outputUrl("https://elsewhere.test/x", [item], "t", base),
          Relay.fileUrl(item, "t"),
        ]""",
        [item, other],
    )
    assert urls == [
        f"{other}/files/ab12?token=t%20k",
        f"{other}/files/ab12?token=t",
        "https://elsewhere.test/x",
        "/files/ab12?token=t",
    ]
