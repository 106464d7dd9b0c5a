"""SSRF-safe GETs: only allowed origins, no redirects, bounded time and size.

A URL inside a webhook body is chosen by whoever produced the body, so fetching it must never
reach what the operator did not allow. In order: the origin must be allowed (`HostPolicy`); the
host is resolved once here, every address is checked (no loopback, private, link-local or other
non-global address unless the origin is listed explicitly), and the connection goes to the
checked address itself, with the original host in `Host` and TLS SNI, so a second DNS answer
cannot swap in another address (DNS rebinding). Redirects are never followed: a 3xx is an answer
like any other for the caller to refuse. Proxies from the environment are ignored, as they
would connect elsewhere.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import httpx

from service.core.errors import InvalidRequest
from service.core.hosts import HostPolicy, Target

Resolver = Callable[[str, int], Awaitable[list[str]]]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(Exception):
    """The URL may not be fetched; nothing was sent. `reason` is one line for an operator."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Unresolved(Refused):
    """The host name gave no address: nothing was sent, but a resolver's hiccup passes, so a
    caller with time (the archive) may try again later."""

    def __init__(self) -> None:
        super().__init__("the host name does not resolve")


class TooLarge(Exception):
    """The body is over the cap (by its Content-Length, or while streaming)."""


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def require_public(url: str, label: str, resolve: Resolver = system_resolve) -> None:
    """InvalidRequest (400) unless every address `url`'s host resolves to is public: what the
    admin API may make Relay send to (replays, destinations) must not reach the services next to
    it. RELAY_REPLAY_PRIVATE=on lifts it (the caller checks that setting). The same check as
    each connection's (`public_only`), answered before anything is stored or sent."""
    parts = urlsplit(url)
    try:
        await public_only(resolve)(parts.hostname or "", parts.port or 443)
    except Unresolved:
        raise InvalidRequest(f"{label}'s host name does not resolve") from None
    except Refused:
        raise InvalidRequest(
            f"{label} resolves to a private, loopback or link-local address; "
            "set RELAY_REPLAY_PRIVATE=on to allow such addresses"
        ) from None


def is_public(address: IpAddress) -> bool:
    """A globally routable unicast address (IPv4-mapped IPv6 judged as the IPv4 inside)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def checked_address(target: Target, resolve: Resolver) -> str:
    """The address to connect to: every resolved address must pass, or the URL is refused
    (one bad answer among good ones is refused too: which one the client would use is chance)."""
    try:
        literal: IpAddress | None = ipaddress.ip_address(target.host)
    except ValueError:
        literal = None
    try:
        found = [str(literal)] if literal is not None else await resolve(target.host, target.port)
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in found]
    except (OSError, ValueError):
        raise Unresolved() from None
    if not addresses:
        raise Unresolved()
    if not target.explicit and not all(is_public(a) for a in addresses):
        raise Refused("the host resolves to a private, loopback or link-local address")
    return str(addresses[0])


def public_only(resolve: Resolver = system_resolve) -> Callable[[str, int], Awaitable[str]]:
    """For a client that posts where the admin API pointed it (replays, destinations): each new
    connection resolves the host, refuses a non-global address and connects to the checked
    one, so a later DNS answer cannot turn a public receiver into a neighbour of Relay's."""

    async def address(host: str, port: int) -> str:
        return await checked_address(Target("", host.strip("[]"), port, explicit=False), resolve)

    return address


def _pinned(url: str, address: str) -> str:
    """`url` with its host replaced by the checked address (the path and query unchanged)."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=host + port))


class GuardedClient:
    """One HTTP client for guarded GETs; `stream(url)` yields the response without following
    redirects. Timeouts: `connect` to open the connection, `read` between two chunks."""

    def __init__(
        self,
        policy: HostPolicy,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        resolve: Resolver = system_resolve,
        max_connections: int = 20,
    ):
        self.policy = policy
        self._resolve = resolve
        self._timeout = httpx.Timeout(
            connect=connect_timeout, read=read_timeout, write=read_timeout, pool=None
        )
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        # One client per host name: connections are pooled by address, and a connection opened
        # with one name's TLS SNI must not carry a request for another name on the same address.
        self._clients: dict[tuple[str, str, int], httpx.AsyncClient] = {}

    def _client_for(self, target: Target) -> httpx.AsyncClient:
        key = (target.scheme, target.host, target.port)
        if key not in self._clients:
            self._clients[key] = httpx.AsyncClient(
                timeout=self._timeout, follow_redirects=False, trust_env=False, limits=self._limits
            )
        return self._clients[key]

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    @asynccontextmanager
    async def stream(self, url: str) -> AsyncIterator[httpx.Response]:
        target = self.policy.target(url)
        if target is None:
            raise Refused("the URL's origin is not an allowed one")
        address = await checked_address(target, self._resolve)
        client = self._client_for(target)
        request = client.build_request(
            "GET",
            _pinned(url, address),
            headers={"Host": urlsplit(url).netloc.rsplit("@", 1)[-1], "Accept-Encoding": "identity"},
            extensions={"sni_hostname": target.host} if target.scheme == "https" else {},
        )
        response = await client.send(request, stream=True)
        try:
            yield response
        finally:
            await response.aclose()


async def capped_chunks(response: httpx.Response, max_bytes: int) -> AsyncIterator[bytes]:
    """The body as it arrives; TooLarge as soon as it is known to exceed `max_bytes` (from
    Content-Length before reading, else once the count passes it): never more is read."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge()
    seen = 0
    async for chunk in response.aiter_raw():
        seen += len(chunk)
        if seen > max_bytes:
            raise TooLarge()
        yield chunk
