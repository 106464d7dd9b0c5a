"""Browser origins against real `relay serve` processes: the WebSocket `Origin` allowlist (default:
same origin) and CORS on `/api` (default: off), from real clients and a real Chromium page."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from service.core.errors import ConfigError
from service.core.settings import load_settings

from .browser import image_server, launch_browser, new_page
from .streams import stream_url
from .support import (
    ADMIN_TOKEN,
    RelayProcess,
    deliver_lifecycle,
    new_prediction_id,
    relay_cli,
    relay_env,
)

APP = "https://app.example.com"
PUBLIC_URL = "https://relay.example.com"


@pytest.fixture(scope="module")
def other_origin() -> Iterator[str]:
    """A real server on another port of the same host: a different origin, as a browser sees it."""
    with image_server() as url:
        yield url


@pytest.fixture(scope="module")
def open_relay(postgres, other_origin) -> Iterator[RelayProcess]:
    """A relay that lets `other_origin` and APP stream, and `other_origin` call /api."""
    env = relay_env(
        postgres.new_database(),
        RELAY_ALLOWED_ORIGINS=f"{other_origin}, {APP}/",
        RELAY_CORS_ORIGINS=other_origin,
        RELAY_PUBLIC_URL=PUBLIC_URL,
    )
    with RelayProcess(env) as process:
        yield process


@pytest.fixture(scope="module")
def finished(relay) -> str:
    """A prediction with a stored lifecycle, so an accepted stream has something to send."""
    prediction_id = new_prediction_id()
    with httpx.Client(base_url=relay.url, timeout=30) as http:
        deliver_lifecycle(http, prediction_id)
    return prediction_id


def streams(relay: RelayProcess, prediction_id: str) -> list[str]:
    """Both stream routes, each with a valid token (so only the origin can refuse them)."""
    return [stream_url(relay, prediction_id), stream_url(relay)]


def first_message(url: str, **options) -> dict:
    with connect(url, open_timeout=10, close_timeout=2, **options) as socket:
        return json.loads(socket.recv(timeout=10))


def refused(url: str, **options) -> int:
    with pytest.raises(InvalidStatus) as error:
        connect(url, open_timeout=10, **options).close()
    return error.value.response.status_code


CROSS_ORIGINS = {
    "another site": lambda port: "https://evil.example",
    "another port": lambda port: f"http://127.0.0.1:{port + 1}",
    "https instead of http": lambda port: f"https://127.0.0.1:{port}",
    "a look-alike host": lambda port: f"http://127.0.0.1.evil.example:{port}",
    "another name for the host": lambda port: f"http://localhost:{port}",
    "a sandboxed page": lambda port: "null",
    "not an origin": lambda port: "garbage",
}


@pytest.mark.parametrize("kind", CROSS_ORIGINS)
def test_cross_origin_handshakes_are_refused_with_403(relay, finished, kind):
    """By default a page from any other origin gets HTTP 403 and no event, even with a valid token."""
    origin = CROSS_ORIGINS[kind](relay.port)
    for url in streams(relay, finished):
        assert refused(url, origin=origin) == 403


def test_same_origin_and_non_browser_clients_may_stream(relay, finished):
    """The dashboard's own origin, a trusted proxy's `X-Forwarded-Proto`, and clients that send
    no `Origin` (relay tail, scripts) all get the stream."""
    for url in streams(relay, finished):
        assert first_message(url)["type"] == "event"
        assert first_message(url, origin=relay.url)["type"] == "event"
        behind_tls = {"X-Forwarded-Proto": "https"}
        https_origin = f"https://127.0.0.1:{relay.port}"
        assert first_message(url, origin=https_origin, additional_headers=behind_tls)["type"] == "event"
    assert first_message(stream_url(relay, finished, token=ADMIN_TOKEN), origin=relay.url)["type"] == "event"


def test_configured_origins_and_the_public_url_may_stream(open_relay, other_origin):
    """RELAY_ALLOWED_ORIGINS adds origins to the relay's own; RELAY_PUBLIC_URL is its own too."""
    prediction_id = new_prediction_id()
    with httpx.Client(base_url=open_relay.url, timeout=30) as http:
        deliver_lifecycle(http, prediction_id)
    for url in streams(open_relay, prediction_id):
        for origin in (APP, other_origin, PUBLIC_URL, open_relay.url):
            assert first_message(url, origin=origin)["prediction_id"] == prediction_id
        assert refused(url, origin="https://evil.example") == 403
        assert refused(url, origin="http://app.example.com") == 403


def preflight(client: httpx.Client, path: str, origin: str) -> httpx.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    return client.options(path, headers=headers)


def test_cors_is_off_by_default(client, other_origin):
    """No RELAY_CORS_ORIGINS: no `Access-Control-Allow-Origin` anywhere, preflight or not."""
    assert "access-control-allow-origin" not in preflight(client, "/api/predictions", other_origin).headers
    answer = client.get("/api/predictions", headers={"Origin": other_origin})
    assert answer.status_code == 401 and "access-control-allow-origin" not in answer.headers


def test_cors_answers_configured_origins_on_api_only(open_relay, other_origin):
    with httpx.Client(base_url=open_relay.url, timeout=30) as http:
        allowed = preflight(http, "/api/predictions", other_origin)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == other_origin
        assert {"authorization", "content-type"} <= set(
            allowed.headers["access-control-allow-headers"].lower().replace(" ", "").split(",")
        )
        assert "POST" in allowed.headers["access-control-allow-methods"]

        answer = http.get("/api/predictions", headers={"Origin": other_origin})
        assert answer.status_code == 401 and answer.headers["access-control-allow-origin"] == other_origin

        for origin in (APP, "https://evil.example"):  # APP may stream, but is not a CORS origin
            assert "access-control-allow-origin" not in preflight(http, "/api/predictions", origin).headers
            answer = http.get("/api/predictions", headers={"Origin": origin})
            assert "access-control-allow-origin" not in answer.headers

        admin = {"Origin": other_origin, "Authorization": f"Bearer {ADMIN_TOKEN}"}
        for path in ("/admin/events", "/webhooks/replicate", "/predictions/p1"):
            assert "access-control-allow-origin" not in preflight(http, path, other_origin).headers
            assert "access-control-allow-origin" not in http.get(path, headers=admin).headers


# Run in a page of another origin: open a stream with a valid token and call /api with a key.
CROSS_ORIGIN_PAGE = """async ([wsUrl, apiUrl, key]) => {
  const stream = await new Promise((resolve) => {
    const socket = new WebSocket(wsUrl);
    socket.onmessage = (message) => { socket.close(); resolve(JSON.parse(message.data).type); };
    socket.onclose = (event) => resolve("closed " + event.code);
  });
  let api;
  try {
    const answer = await fetch(apiUrl, {headers: {Authorization: "Bearer " + key}});
    api = answer.status + " " + (await answer.json()).error.code;
  } catch (error) {
    api = error.name;
  }
  return [stream, api];
}"""


def test_a_page_on_another_origin_uses_relay_only_when_allowed(relay, open_relay, other_origin):
    """A real browser on another origin: by default it can neither open a stream (the handshake is
    refused) nor read an /api answer (no CORS); allowed in settings, it can do both."""
    prediction_id = new_prediction_id()
    for server in (relay, open_relay):
        with httpx.Client(base_url=server.url, timeout=30) as http:
            deliver_lifecycle(http, prediction_id)
    with launch_browser() as browser, new_page(browser) as page:
        page.goto(other_origin + "/page")
        results = {
            server: page.evaluate(
                CROSS_ORIGIN_PAGE,
                [stream_url(server, prediction_id), server.url + "/api/predictions", ADMIN_TOKEN],
            )
            for server in (relay, open_relay)
        }
    assert results[relay] == ["closed 1006", "TypeError"]
    assert results[open_relay] == ["event", "503 PROXY_DISABLED"]


@pytest.mark.parametrize(
    "value", ["app.example.com", "https://app.example.com/path", "ftp://app.example.com", "https://"]
)
@pytest.mark.parametrize("name", ["RELAY_ALLOWED_ORIGINS", "RELAY_CORS_ORIGINS"])
def test_an_origin_setting_that_is_not_origins_is_one_clear_error(name, value):
    with pytest.raises(ConfigError, match=f"^{name} entry .* is not an origin; write scheme://host"):
        load_settings({name: f"https://ok.example, {value}"}, generate_missing=False)


def test_origin_settings_are_normalised_like_browser_origins():
    settings = load_settings(
        {
            "RELAY_ALLOWED_ORIGINS": "HTTPS://App.Example.com:443/, http://[::1]:8080,*",
            "RELAY_CORS_ORIGINS": "",
        },
        generate_missing=False,
    )
    assert settings.allowed_origins == ("https://app.example.com", "http://[::1]:8080", "*")
    assert settings.cors_origins == ()


def test_relay_serve_refuses_a_bad_origin_setting_with_exit_2():
    result = relay_cli(
        "serve",
        "--port",
        "0",
        env=relay_env("postgresql://relay@127.0.0.1:1/relay", RELAY_CORS_ORIGINS="*.example.com"),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        (
            "relay: error: RELAY_CORS_ORIGINS entry '*.example.com' is not an origin; write "
            "scheme://host[:port] (no path), e.g. https://app.example.com, comma-separated, or *"
        )
    ]
