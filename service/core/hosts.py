"""Which origins' URLs Relay may download (`RELAY_ARCHIVE_HOSTS`): pure matching, no network.

An entry is an origin, `scheme://host[:port]`, or `https://*.domain` for every subdomain. Only an
entry that names its host exactly is *explicit*: it may use plain `http` and point at a private,
loopback or link-local address (a file server on the operator's own network). A wildcard
matches `https` hosts only, and service/net/guard.py refuses them any non-public address.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from service.core.errors import ConfigError

DEFAULT_PORTS = {"http": 80, "https": 443}
DEFAULT_ARCHIVE_HOSTS = ("https://replicate.delivery", "https://*.replicate.delivery")


@dataclass(frozen=True)
class Target:
    """Where a URL points, once it is allowed: what the fetcher resolves and connects to."""

    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int
    explicit: bool  # its origin is listed exactly: private addresses are allowed


@dataclass(frozen=True)
class HostPattern:
    scheme: str
    host: str  # exact host, or the domain after `*.`
    port: int
    wildcard: bool

    def matches(self, scheme: str, host: str, port: int) -> bool:
        if scheme != self.scheme or port != self.port:
            return False
        return host.endswith("." + self.host) if self.wildcard else host == self.host


def _split(text: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL with a host and no credentials, else None."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        return None
    return scheme, parts.hostname.lower().rstrip("."), port or DEFAULT_PORTS[scheme]


def parse_pattern(entry: str, name: str = "RELAY_ARCHIVE_HOSTS") -> HostPattern:
    wildcard = "://*." in entry
    split = _split(entry.replace("://*.", "://", 1))
    parts = urlsplit(entry)
    if split is None or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(
            f"{name} entry {entry[:80]!r} is not an origin; write scheme://host[:port] "
            "or https://*.domain, space-separated"
        )
    scheme, host, port = split
    if wildcard and scheme != "https":
        raise ConfigError(f"{name} entry {entry[:80]!r}: a *. wildcard is for https origins only")
    return HostPattern(scheme, host, port, wildcard)


class HostPolicy:
    """The parsed RELAY_ARCHIVE_HOSTS: which URLs may be fetched, and which are explicit."""

    def __init__(self, entries: Iterable[str], name: str = "RELAY_ARCHIVE_HOSTS"):
        self.patterns = tuple(parse_pattern(entry, name) for entry in entries)

    def target(self, url: str) -> Target | None:
        """Where `url` points if its origin is allowed, else None. Plain `http` only for an
        origin listed exactly."""
        split = _split(url)
        if split is None:
            return None
        scheme, host, port = split
        found = [p for p in self.patterns if p.matches(scheme, host, port)]
        if not found:
            return None
        explicit = any(not p.wildcard for p in found)
        if scheme != "https" and not explicit:
            return None
        return Target(scheme, host, port, explicit)

    def allows(self, url: str) -> bool:
        return self.target(url) is not None
