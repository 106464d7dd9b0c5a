"""Bad parameters are 400s with the error shape on every route, never a 5xx (hypothesis-fuzzed)."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus

from service.core.filters import FILTER_NAMES

from .fake_replicate import api_client
from .streams import read_to_close, receive, stream_url, subscribe
from .support import deliver_lifecycle, new_prediction_id

BIG = str(2**63)
HUGE = "9" * 5000
EARLY = "0001-01-01T00:00:00+05:00"
LATE = "9999-12-31T23:59:59-05:00"
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Every query parameter of every GET route, by route (the path's id is fuzzed separately).
ROUTES = {
    "/predictions/{id}": ("token",),
    "/predictions/{id}/events": ("after", "limit", "token"),
    "/admin/events": (*FILTER_NAMES, "limit", "token"),
    "/admin/usage": ("since", "until", "group", "token"),
    "/admin/predictions": ("limit", "token"),
}

values = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from([BIG, HUGE, EARLY, LATE, "a\x00b", "", "-1", "1e3", "0x10", "٣", "2026-13-01"]),
    st.datetimes().map(lambda moment: moment.isoformat() + "+14:00"),
    st.datetimes().map(lambda moment: moment.isoformat() + "-23:59"),
)
ids = st.one_of(st.text(min_size=1, max_size=40), st.sampled_from(["a\x00b", "x" * 5000, "..", "%00"]))


def assert_clean(response: httpx.Response) -> None:
    """Below 500, and an error answer carries the error shape."""
    assert response.status_code < 500, response.text[:300]
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"code", "message"}


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/predictions/{id}/events", {"after": BIG}),
        ("/predictions/{id}/events", {"after": HUGE}),
        ("/predictions/{id}/events", {"limit": HUGE}),
        ("/admin/events", {"after": BIG}),
        ("/admin/events", {"before": HUGE}),
        ("/admin/events", {"since": EARLY}),
        ("/admin/events", {"until": LATE}),
        ("/admin/events", {"prediction_id": "a\x00b"}),
        ("/admin/usage", {"since": EARLY}),
        ("/admin/usage", {"until": LATE}),
        ("/admin/predictions", {"limit": HUGE}),
    ],
)
def test_the_probes_500s_are_400s(admin, path, params):
    response = admin.get(path.format(id=new_prediction_id()), params=params)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "INVALID_REQUEST"


@pytest.mark.parametrize(
    "path", ["/predictions/a%00b", "/predictions/a%00b/events", "/admin/predictions/a%00b"]
)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_nul_in_a_path_id_is_400(admin, path, method):
    response = admin.request(method, path)
    assert response.status_code in (400, 405) and response.json()["error"]["code"]
    if method == "GET" or path.startswith("/admin"):
        assert response.status_code == 400


@pytest.mark.parametrize("bad", [{"after": BIG}, {"before": HUGE}, {"since": EARLY}, {"until": LATE}])
def test_replay_filters_the_database_cannot_take_are_400(admin, bad):
    body = {"filter": bad, "target": {"fanout": True}, "dry_run": True}
    response = admin.post("/admin/replay", json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_REQUEST"


@FUZZ
@given(route=st.sampled_from(sorted(ROUTES)), data=st.data())
def test_fuzzed_query_parameters_of_every_route_get_clean_answers(admin, route, data):
    """Any value in any query parameter of any GET route: below 500, errors in the shape."""
    names = data.draw(st.lists(st.sampled_from(ROUTES[route]), min_size=1, max_size=3, unique=True))
    params = {name: data.draw(values) for name in names}
    params.pop("token", None) if data.draw(st.booleans()) else None
    path = route.format(id=new_prediction_id())
    assert_clean(admin.get(path, params=params))


@FUZZ
@given(prediction_id=ids, suffix=st.sampled_from(["", "/events"]), method=st.sampled_from(["GET", "DELETE"]))
def test_fuzzed_path_ids_get_clean_answers(admin, prediction_id, suffix, method):
    base = "/admin/predictions/" if method == "DELETE" else "/predictions/"
    assert_clean(admin.request(method, base + quote(prediction_id, safe="") + suffix))


@FUZZ
@given(filters=st.dictionaries(st.sampled_from(FILTER_NAMES), st.one_of(values, st.integers(), st.none())))
def test_fuzzed_replay_filters_get_clean_answers(admin, filters):
    body = {"filter": filters, "target": {"fanout": True}, "dry_run": True}
    assert_clean(admin.post("/admin/replay", json=body))


@FUZZ
@given(wait=values)
def test_fuzzed_replay_wait_gets_clean_answers(admin, wait):
    """`?wait=` of POST /admin/replay, the one query parameter of a POST route."""
    body = {"filter": {"prediction_id": "nothing-matches"}, "target": {"fanout": True}, "dry_run": True}
    assert_clean(admin.post("/admin/replay", params={"wait": wait}, json=body))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cursor=values)
def test_fuzzed_api_list_cursor_gets_clean_answers(api_relay, fake, cursor):
    with api_client(api_relay) as api:
        assert_clean(api.get("/api/predictions", params={"cursor": cursor}))


async def close_of(url: str) -> tuple[int | None, str]:
    async with subscribe(url) as ws:
        await read_to_close(ws, timeout=5)
        return ws.close_code, ws.close_reason or ""


@pytest.mark.parametrize("after", [BIG, HUGE, "-1", "x", "\U000f41f5" * 40])
def test_a_websocket_after_the_server_cannot_parse_closes_1008_with_a_reason(relay, after):
    url = stream_url(relay, None) + f"&after={after}"
    code, reason = asyncio.run(close_of(url))
    assert code == 1008 and "after" in reason


def test_a_websocket_after_beyond_the_log_head_closes_1008_with_a_reason(client, relay):
    """An `after` past every stored seq would answer caught_up and then skip events: refused."""
    seqs = deliver_lifecycle(client, new_prediction_id())
    for prediction_id in (None, new_prediction_id()):
        code, reason = asyncio.run(close_of(stream_url(relay, prediction_id, after=seqs[-1] + 10_000)))
        assert code == 1008 and "beyond the log's head" in reason


def test_a_websocket_path_with_nul_is_refused_at_the_handshake(relay):
    url = stream_url(relay, "a%00b")

    async def attempt() -> None:
        async with subscribe(url):
            pass

    with pytest.raises(InvalidStatus):
        asyncio.run(attempt())


@settings(
    max_examples=25,
    deadline=None,
    phases=[Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(after=values)
def test_fuzzed_websocket_after_either_streams_or_closes_1008(relay, after):
    """A usable `after` gets the backlog and caught_up; any other is closed 1008 with a reason."""
    url = stream_url(relay, None) + "&after=" + quote(after, safe="")

    async def first() -> tuple[dict | None, int | None, str]:
        async with subscribe(url) as ws:
            try:
                message = await receive(ws, timeout=5)
            except ConnectionClosed:
                return None, ws.close_code, ws.close_reason or ""
            return message, None, ""

    message, code, reason = asyncio.run(first())
    if message is None:
        assert code == 1008 and "after" in reason
    else:
        assert message["type"] in ("event", "caught_up")
