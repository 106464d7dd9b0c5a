"""Browser origins in the one normal form that Relay compares (`scheme://host[:port]`)."""

from __future__ import annotations

from urllib.parse import urlsplit

ANY = "*"
HTTP_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
DEFAULT_PORTS = {"http": 80, "https": 443}


def normal_origin(text: str) -> str | None:
    """`scheme://host[:port]` as browsers send it (lower case, no default port), or None when
    `text` is not an origin. `ws`/`wss` map to `http`/`https`, so a handshake URL compares too."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = HTTP_SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.hostname or parts.username is not None or parts.password is not None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{host}" + ("" if port in (None, DEFAULT_PORTS[scheme]) else f":{port}")
