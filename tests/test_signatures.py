"""service.signatures.verify and ingest.parse_prediction as pure functions, fuzzed with hypothesis."""

from __future__ import annotations

import ast
import hmac
import inspect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core import signatures
from service.core.errors import InvalidPayload, InvalidSignature, RelayError, TimestampOutOfTolerance
from service.core.settings import load_settings
from service.core.signatures import sign, signed_headers, verify
from service.ingest.committer import MAX_DEPTH, parse_prediction

from .support import relay_env

KEY = b"property-test-key-0123456789"
NOW = 1_760_000_000
TOLERANCE = 300

header_values = st.one_of(
    st.text(max_size=60),
    st.text(alphabet="v1,= +/0123456789abcdefABCDEF", max_size=120),
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
)
# HTTP header values arrive as latin-1; verify allows printable webhook-ids of at most 256 chars.
webhook_ids = st.text(st.characters(codec="latin-1").filter(str.isprintable), min_size=1, max_size=256)


@settings(max_examples=1000, deadline=None)  # no wall-clock limit: the machine may be busy
@given(
    headers=st.dictionaries(
        st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature", "other"]), header_values
    ),
    body=st.binary(max_size=200),
)
def test_any_headers_are_accepted_or_refused_with_401_never_another_error(headers, body):
    """Malformed headers of every kind become one verification error (401), never a crash."""
    try:
        verify(headers, body, [KEY], TOLERANCE, now=NOW)
    except RelayError as error:
        assert error.status == 401
    else:  # accepting a header set we did not sign would be a forgery
        pytest.fail(f"accepted unsigned headers {headers!r}")


@settings(max_examples=300, deadline=None)  # no wall-clock limit: the machine may be busy
@given(webhook_id=webhook_ids, body=st.binary(max_size=500), skew=st.integers(-TOLERANCE, TOLERANCE))
def test_a_correct_signature_within_tolerance_always_verifies(webhook_id, body, skew):
    headers = signed_headers(KEY, webhook_id, body, NOW + skew)
    assert verify(headers, body, [b"other-key", KEY], TOLERANCE, now=NOW) == (webhook_id, NOW + skew)


@settings(max_examples=300, deadline=None)  # no wall-clock limit: the machine may be busy
@given(
    webhook_id=webhook_ids,
    body=st.binary(max_size=200),
    change=st.sampled_from(["body", "id", "timestamp", "key", "age"]),
)
def test_any_change_to_a_signed_delivery_is_refused(webhook_id, body, change):
    timestamp = NOW
    headers = signed_headers(KEY, webhook_id, body, timestamp)
    if change == "body":
        body += b"\n"
    elif change == "id":
        headers["webhook-id"] = webhook_id + "x"
    elif change == "timestamp":
        headers["webhook-timestamp"] = str(timestamp + 1)
    elif change == "key":
        headers["webhook-signature"] = sign(KEY + b"!", webhook_id, timestamp, body)
    else:
        headers = signed_headers(KEY, webhook_id, body, NOW - TOLERANCE - 1)
    with pytest.raises(RelayError) as refused:
        verify(headers, body, [KEY], TOLERANCE, now=NOW)
    assert refused.value.status == 401


@settings(max_examples=500, deadline=None)  # no wall-clock limit: the machine may be busy
@given(body=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_any_bytes_parse_to_an_object_or_a_clean_400(body):
    try:
        assert isinstance(parse_prediction(body), dict)
    except InvalidPayload as error:
        assert error.status == 400


@pytest.mark.parametrize("depth, accepted", [(MAX_DEPTH, True), (MAX_DEPTH + 1, False)])
def test_nesting_is_bounded_explicitly(depth, accepted):
    body = b'{"v":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    if accepted:
        assert parse_prediction(body)["v"] is not None
    else:
        with pytest.raises(InvalidPayload):
            parse_prediction(body)


DEFAULT_TOLERANCE = 300


def test_the_configured_default_tolerance_is_300_seconds():
    env = relay_env("postgresql://unused/db")
    assert load_settings(env).webhook_tolerance == DEFAULT_TOLERANCE


@pytest.mark.parametrize("skew, accepted", [(-300, True), (300, True), (-301, False), (301, False)])
def test_the_tolerance_is_exact_in_both_directions(skew, accepted):
    """With the default 300 s, a timestamp exactly 300 s off verifies and 301 s off is refused."""
    headers = signed_headers(KEY, "msg_edge", b"{}", NOW + skew)
    if accepted:
        assert verify(headers, b"{}", [KEY], DEFAULT_TOLERANCE, now=NOW) == ("msg_edge", NOW + skew)
    else:
        with pytest.raises(TimestampOutOfTolerance):
            verify(headers, b"{}", [KEY], DEFAULT_TOLERANCE, now=NOW)


def _is_compare_digest(node: ast.AST) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    return (isinstance(func, ast.Attribute) and func.attr == "compare_digest") or (
        isinstance(func, ast.Name) and func.id == "compare_digest"
    )


def _computes_hmac(node: ast.AST) -> bool:
    return any(
        isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "new"
        for call in ast.walk(node)
    )


def test_verify_compares_signatures_only_with_hmac_compare_digest():
    """In verify, each expected HMAC reaches only hmac.compare_digest: no ==, !=, in (timing leaks)."""
    function = ast.parse(inspect.getsource(signatures.verify)).body[0]
    compares = [node for node in ast.walk(function) if _is_compare_digest(node)]
    assert compares, "verify no longer calls hmac.compare_digest"
    digests = {
        target.id
        for node in ast.walk(function)
        if isinstance(node, ast.Assign) and _computes_hmac(node.value)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert digests, "verify no longer computes the expected HMAC into a variable"
    arguments = {id(arg) for call in compares for arg in call.args}
    uses = [
        node
        for node in ast.walk(function)
        if isinstance(node, ast.Name) and node.id in digests and isinstance(node.ctx, ast.Load)
    ]
    assert uses and all(id(node) in arguments for node in uses), (
        "an expected HMAC is used outside compare_digest"
    )
    equality = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)
    operators = [op for node in ast.walk(function) if isinstance(node, ast.Compare) for op in node.ops]
    assert not any(isinstance(op, equality) for op in operators), "verify compares with ==, !=, or in"


def test_verify_accepts_only_what_hmac_compare_digest_accepts(monkeypatch):
    """A correct signature is accepted through hmac.compare_digest, and refused when it says no."""
    body = b'{"id":"p1","status":"starting"}'
    headers = signed_headers(KEY, "msg_1", body, timestamp=NOW)
    calls = []
    original = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert verify(headers, body, [KEY], TOLERANCE, now=NOW) == ("msg_1", NOW)
    assert calls and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: False)
    with pytest.raises(InvalidSignature):
        verify(headers, body, [KEY], TOLERANCE, now=NOW)


def test_token_checks_compare_with_hmac_compare_digest(monkeypatch):
    """matches_any (admin token, API keys) runs every configured secret through compare_digest."""
    from service.core import auth

    calls = []
    original = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert auth.matches_any("secret-b", ["secret-a", "secret-b", "secret-c"]) and len(calls) == 3
    function = ast.parse(inspect.getsource(auth.matches_any)).body[0]
    operators = [op for node in ast.walk(function) if isinstance(node, ast.Compare) for op in node.ops]
    assert not any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in operators)
