"""`GET /openapi.json`: every HTTP route described, and a real Relay fuzzed against the document."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from starlette.routing import Mount, Route, WebSocketRoute

from service.core.settings import Secret, Settings
from service.web.app import create_app, openapi_document

from .fake_replicate import FakeReplicate, relay_for
from .fuzzing import can_break, fuzz
from .support import ADMIN_TOKEN, RelayProcess

# Bounded so the fuzz stays well under a minute; bench/fuzz.py runs many more cases.
FUZZ_EXAMPLES = 15
NEGATIVE_EXAMPLES = 6


def http_operations() -> set[tuple[str, str]]:
    """(method, path) of every HTTP route the app serves (HEAD comes with GET)."""
    settings = Settings(admin_token=Secret("a"), subscribe_key=Secret("s"))
    app = create_app(settings, "postgresql://unused")
    found = set()
    for route in app.routes:
        if isinstance(route, WebSocketRoute):
            continue
        if isinstance(route, Mount):
            found.add(("get", f"{route.path}/{{path}}"))
            continue
        assert isinstance(route, Route)
        found |= {(method.lower(), route.path) for method in route.methods or () if method != "HEAD"}
    return found


def documented_operations() -> set[tuple[str, str]]:
    return {(method, path) for path, methods in openapi_document()["paths"].items() for method in methods}


def test_every_http_route_is_described_and_nothing_else():
    """A route added without its `openapi` entry (or an entry without a route) fails here."""
    served, described = http_operations(), documented_operations()
    assert served - described == set(), "routes without an OpenAPI operation"
    assert described - served == set(), "OpenAPI operations without a route"


def test_every_operation_has_a_summary_tag_security_and_error_shape():
    document = openapi_document()
    assert document["openapi"] == "3.1.0"
    assert set(document["components"]["securitySchemes"]) == {"AdminToken", "ApiKey", "SubscriberToken"}
    for path, methods in document["paths"].items():
        for method, spec in methods.items():
            assert spec["summary"] and spec["tags"] and "security" in spec, (method, path)
            for status, answer in spec["responses"].items():
                if status == "416":
                    continue  # Range Not Satisfiable: no body, Content-Range says why (RFC 9110)
                if status.startswith(("4", "5")) and path != "/readyz":
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


def test_the_create_body_names_exactly_the_fields_relay_accepts():
    from service.core.validation import REQUEST_FIELDS

    body = openapi_document()["paths"]["/api/predictions"]["post"]["requestBody"]
    described = set(body["content"]["application/json"]["schema"]["properties"])
    assert described == REQUEST_FIELDS - {"webhook"}  # accepted only as Relay's own URL: not offered


@pytest.fixture(scope="module")
def fuzzed_relay(postgres, fake: FakeReplicate) -> Iterator[RelayProcess]:
    with relay_for(postgres.new_database(), fake) as relay:
        yield relay


def test_the_served_document_is_the_built_one(fuzzed_relay):
    response = httpx.get(fuzzed_relay.url + "/openapi.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.json() == openapi_document()


@pytest.fixture(scope="module")
def live_schema(fuzzed_relay: RelayProcess) -> schemathesis.BaseSchema:
    """The document as the running Relay serves it, requests aimed at that Relay."""
    return schemathesis.openapi.from_url(fuzzed_relay.url + "/openapi.json")


OPERATIONS = sorted(documented_operations())


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m.upper()} {p}" for m, p in OPERATIONS])
def test_fuzzed_requests_get_no_5xx_and_answers_that_match_the_document(live_schema, fake, method, path):
    """Generated requests with a valid token: no server error, every answer as documented."""
    fuzz(live_schema, method, path, FUZZ_EXAMPLES, ADMIN_TOKEN, derandomize=True)


BREAKABLE = [(m, p) for m, p in OPERATIONS if can_break(openapi_document(), m, p)]


@pytest.mark.parametrize(("method", "path"), BREAKABLE, ids=[f"{m.upper()} {p}" for m, p in BREAKABLE])
def test_fuzzed_invalid_requests_get_a_4xx_in_the_error_shape(live_schema, fake, method, path):
    """Requests that break the document (wrong types, missing fields): refused, never a 5xx."""
    fuzz(
        live_schema, method, path, NEGATIVE_EXAMPLES, ADMIN_TOKEN, schemathesis.GenerationMode.NEGATIVE, True
    )


@pytest.mark.parametrize(
    "path",
    [
        "/predictions/p1/events?after=10998592978175598608252928",  # past 2^63-1: was a 500
        "/predictions/p1/events?after=" + "9" * 5000,  # past Python's 4,300-digit int(): was a 500
        "/admin/events?since=0001-01-01T00:00:00%2B05:00",  # year 0 in UTC
        "/admin/usage?since=0001-01-01T00:00:00%2B05:00",
    ],
)
def test_parameters_the_database_cannot_take_are_400s(fuzzed_relay, path):
    """Found by the fuzzer: each answered 500 before parameters were bounded (core/params.py)."""
    response = httpx.get(fuzzed_relay.url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_REQUEST"


def test_the_docs_api_reference_is_generated_from_the_document(monkeypatch):
    """docs/hooks/openapi_reference.py renders every operation (the mkdocs page cannot drift)."""
    import importlib.util

    from .support import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "docs/hooks"))  # as mkdocs loads a hook: beside its siblings
    spec = importlib.util.spec_from_file_location(
        "openapi_reference", ROOT / "docs/hooks/openapi_reference.py"
    )
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    markdown = hook.render(openapi_document())
    for method, path in documented_operations():
        assert f"### `{method.upper()} {path}`" in markdown
    assert hook.MARKER in (ROOT / "docs/api.md").read_text()
