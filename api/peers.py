"""Who a connection comes from, for the per-client limits of HTTP and DNS over TCP."""

from __future__ import annotations

import ipaddress
from typing import Any


def client_key(addr: Any) -> str:
    """The client a peer address belongs to: its IP address, or for IPv6 its /64.

    One host is commonly given a whole IPv6 /64 and could otherwise present 2^64 addresses
    to a per-address limit. An IPv4-mapped IPv6 address is the IPv4 client it maps.
    """
    host = str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))
