"""Browser test support: Debian's headless Chromium driven by Playwright, a local image server
standing in for replicate.delivery, and a pair of `relay serve` processes on one database (one
to restart under the browser, one that keeps receiving webhooks meanwhile)."""

from __future__ import annotations

import contextlib
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from .support import ADMIN_TOKEN, ROOT, Postgres, RelayProcess, relay_env

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 15_000


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: run `apt-get install -y chromium` (.ci/run does it)")
    return path


@contextlib.contextmanager
def launch_browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def new_page(browser: Browser, **context_options) -> Iterator[Page]:
    """A fresh context (its own sessionStorage) and page; console errors fail the test."""
    context = browser.new_context(**context_options)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def save_screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def dashboard_url(relay: RelayProcess, path: str = "/", token: str = ADMIN_TOKEN) -> str:
    return f"{relay.url}{path}#token={token}"


def png(width: int = 64, height: int = 64) -> bytes:
    """A small gradient PNG: what an image model's output looks like to the browser."""

    def pixel(x: int, y: int) -> bytes:
        return bytes((x * 4 % 256, y * 4 % 256, 160))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"".join(pixel(x, y) for x in range(width)) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


class _ImageHandler(BaseHTTPRequestHandler):
    image = png()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.write(self.image)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def image_server() -> Iterator[str]:
    """A local stand-in for replicate.delivery: every path is a PNG. Yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def relay_pair(postgres: Postgres) -> Iterator[tuple[RelayProcess, RelayProcess]]:
    """Two `relay serve` processes sharing one database: (served to the browser, receiver)."""
    env = relay_env(postgres.new_database())
    with RelayProcess(env) as served, RelayProcess(env) as receiver:
        yield served, receiver
