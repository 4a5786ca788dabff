"""Addresses: what is loopback, and which networks a setting names.  One place for the node's
connection caps, the balancer's stand-in guard and the site's /metrics access."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address literal ``host`` (brackets allowed), IPv4-mapped IPv6 as IPv4; None for
    anything else.  Names are never resolved: a made-up DNS name may resolve to somebody's real
    machine."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(host: str | None) -> bool:
    """``localhost`` and loopback address literals (127.0.0.0/8, ::1, ::ffff:127.x.x.x)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    address = ip(host)
    return address is not None and address.is_loopback


def parse_networks(entries: Iterable[str], variable: str) -> list[Network]:
    """Networks from ``a.b.c.d/n`` (or single address) entries; ValueError naming ``variable``
    for an entry that is neither."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{variable}: {entry!r} is not an address or network") from None
    return networks


def in_networks(host: str, networks: Iterable[Network]) -> bool:
    address = ip(host)
    return address is not None and any(address in network for network in networks)
