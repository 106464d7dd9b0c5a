"""The create-request checks in service/core/validation.py: pure, no server."""

from __future__ import annotations

import pytest

from service.core.errors import RelayError
from service.core.validation import MODELS, ModelSchema, Rule, Target, create_request, parse_version

QWEN = "qwen/qwen-image-edit-plus"
VERSION = "a" * 64
GOOD = {"image": ["https://e.com/a.png"], "prompt": "p"}
BAD = {"image": ["https://e.com/a.png"], "prompt": ""}
HOOK = "http://relay/webhooks/replicate"


@pytest.mark.parametrize(
    ("version", "parsed"),
    [(QWEN, (QWEN, None)), (f"{QWEN}:{VERSION}", (QWEN, VERSION)), (VERSION, (None, VERSION))],
)
def test_each_version_form_names_its_model_and_id(version, parsed):
    assert parse_version(version) == parsed


@pytest.mark.parametrize(
    "body",
    [{"model": QWEN}, {"version": QWEN}, {"version": f"{QWEN}:{VERSION}"}],
    ids=["model", "version owner/name", "version owner/name:id"],
)
def test_every_form_naming_qwen_is_checked(body):
    with pytest.raises(RelayError, match="input.prompt"):
        create_request({**body, "input": BAD}, HOOK)


def test_a_bare_id_is_checked_when_known_to_be_qwen():
    with pytest.raises(RelayError, match="input.prompt"):
        create_request({"version": VERSION, "input": BAD}, HOOK, {VERSION: QWEN})
    target, _ = create_request({"version": VERSION, "input": BAD}, HOOK, {})
    assert target == Target("predictions", None, VERSION)


def test_a_second_model_is_one_table_entry(monkeypatch):
    """Adding a ModelSchema to MODELS is all it takes for every form naming it to be validated."""
    scale = Rule(lambda v: None if v in (2, 4) else "must be 2 or 4", {"enum": [2, 4]})
    other = ModelSchema("acme/upscaler", {"scale": scale}, versions=frozenset({"b" * 64}))
    monkeypatch.setitem(MODELS, other.name, other)
    for body in ({"model": other.name}, {"version": f"{other.name}:x1"}, {"version": "b" * 64}):
        with pytest.raises(RelayError, match="input.scale must be 2 or 4"):
            create_request({**body, "input": {"scale": 3}}, HOOK)


def test_the_cache_key_is_the_pinned_version_else_the_model():
    assert create_request({"model": QWEN, "input": GOOD}, HOOK)[0].cache_key == QWEN
    assert create_request({"version": QWEN, "input": GOOD}, HOOK)[0].cache_key == QWEN
    assert create_request({"version": f"{QWEN}:{VERSION}", "input": GOOD}, HOOK)[0].cache_key == VERSION
