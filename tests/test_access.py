"""Every route declares who may call it; the declaration, not the handler, does the checking."""

from __future__ import annotations

import pytest
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from service.core.settings import load_settings
from service.web.app import create_app
from service.web.auth import (
    ADMIN,
    API_KEY,
    PUBLIC,
    SIGNED,
    SUBSCRIBER,
    GuardedRoute,
    GuardedWebSocketRoute,
    route,
)
from service.web.routes.batches import BATCH_READER
from service.web.routes.files import FILE_READER
from service.web.routes.webhooks import endpoint

from .support import relay_env

EXPECTED = {
    "/healthz": PUBLIC,
    "/readyz": PUBLIC,
    "/metrics": PUBLIC,
    "/": PUBLIC,
    "/relay.js": PUBLIC,
    "/p/{prediction_id}": PUBLIC,
    "/webhooks/replicate": SIGNED,
    "/predictions/{prediction_id}": SUBSCRIBER,
    "/predictions/{prediction_id}/events": SUBSCRIBER,
    "/predictions/{prediction_id}/ws": SUBSCRIBER,
    "/events/ws": ADMIN,
    "/admin/events": ADMIN,
    "/admin/replay": ADMIN,
    "/admin/predictions": ADMIN,
    "/admin/predictions/{prediction_id}": ADMIN,
    "/admin/usage": ADMIN,
    "/api/predictions": API_KEY,
    "/api/predictions/{prediction_id}": API_KEY,
    "/api/predictions/{prediction_id}/cancel": API_KEY,
    "/files/{sha256}": FILE_READER,
    "/admin/destinations": ADMIN,
    "/api/batches": API_KEY,
    "/batches/{batch_id}/ws": BATCH_READER,
}


def test_every_route_of_the_app_declares_its_access(monkeypatch):
    """No route is a bare Starlette route (only static files are mounted), and the known ones
    carry the access the contract gives them."""
    for name, value in relay_env("postgresql://unused/relay").items():
        monkeypatch.setenv(name, value)
    app = create_app(load_settings(generate_missing=False), "postgresql://unused/relay")
    declared: dict[str, object] = {}
    for each in app.routes:
        if isinstance(each, Mount):
            assert isinstance(each.app, StaticFiles), each.path
            continue
        assert isinstance(each, GuardedRoute | GuardedWebSocketRoute), f"{each.path} declares no access"
        assert declared.setdefault(each.path, each.access) is each.access, each.path
    for path, access in EXPECTED.items():
        assert declared.get(path) is access, path


def test_a_bare_asgi_endpoint_cannot_claim_a_check_it_would_not_get():
    """The guard wraps request handlers only: an ASGI endpoint must declare SIGNED or PUBLIC."""
    with pytest.raises(TypeError, match="SIGNED or PUBLIC"):
        route("/x", endpoint, access=ADMIN)
