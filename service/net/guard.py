"""Which addresses outbound requests that a request's content can steer may reach.

`system_resolve` and `is_public` are the same as the archive branch's guard (its GuardedClient,
which also pins the checked address, lives there); merged, that module replaces this one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public(address: IpAddress) -> bool:
    """A globally routable unicast address (IPv4-mapped IPv6 judged as the IPv4 inside)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast
