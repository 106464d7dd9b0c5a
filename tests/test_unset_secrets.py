"""An unset secret (None: settings read by a tool, or built by a test) lets nobody in, clearly."""

from __future__ import annotations

import pytest

from service.core.auth import mint_token, require_admin, require_api_key, require_reader
from service.core.errors import ConfigError, Forbidden, Unauthorized


def test_an_unset_admin_token_refuses_every_token_with_403():
    """require_admin with no admin token configured answers 403, never a crash (500)."""
    with pytest.raises(Forbidden):
        require_admin("anything", None)
    with pytest.raises(Unauthorized):
        require_admin(None, None)


def test_an_unset_subscribe_key_refuses_subscriber_tokens_with_403():
    """require_reader with neither secret configured refuses a token with 403, never a crash."""
    with pytest.raises(Forbidden):
        require_reader("eyJhbGciOiJIUzI1NiJ9.e30.x", "p1", None, None)


def test_api_keys_still_work_without_an_admin_token():
    """A configured API key is accepted when the admin token is unset; another token is refused."""
    assert require_api_key("key-1", None, ["key-1"]) == "key-1"
    with pytest.raises(Forbidden):
        require_api_key("key-2", None, ["key-1"])


def test_minting_without_a_subscribe_key_is_one_clear_config_error():
    """mint_token with no RELAY_SUBSCRIBE_KEY names the variable instead of a PyJWT traceback."""
    with pytest.raises(ConfigError, match="RELAY_SUBSCRIBE_KEY"):
        mint_token(None, "p1")
