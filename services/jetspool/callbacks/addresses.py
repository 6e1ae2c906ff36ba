"""Where a callback may be sent (SPEC §6), checked after DNS resolution.

A callback URL must be http or https. Its host is resolved (an IP literal as itself, a name
through `callbacks.hosts` first, then the system resolver), and every address it resolves to is
checked: link-local and cloud metadata addresses are always refused, loopback and private ranges
too when `callbacks.deny_private` is set. Delivery connects to the address that was checked (the
URL's host stays in `Host` and in TLS's SNI and certificate check), so a name cannot resolve to a
harmless address for the check and a forbidden one for the connection (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import httpx

from jetspool.domain.errors import InvalidInput
from jetspool.domain.functions import shown

if TYPE_CHECKING:
    from collections.abc import Mapping

    from jetspool.settings import CallbackSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_METADATA: Final = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
    )
)
_PORTS: Final = 65536
_PROTOCOL_ASSIGNMENTS: Final = ipaddress.ip_network("192.0.0.0/24")
"""Not public (IANA), though Python 3.11's `is_global` says so for most of it."""
_CARRY_LAST_32: Final = (
    ipaddress.ip_network("64:ff9b::/96"),
    ipaddress.ip_network("64:ff9b:1::/48"),
    ipaddress.ip_network("::/96"),
)
"""IPv6 prefixes whose addresses end in an IPv4 address (NAT64 well-known and local-use, IPv4-compatible)."""


class RefusedAddress(InvalidInput):
    """A callback URL that may not be called (422 at submit; a failed delivery later)."""


@dataclass(frozen=True, slots=True)
class Destination:
    """A callback URL and the checked address to connect to for it."""

    url: httpx.URL
    address: IPAddress

    @property
    def pinned_url(self) -> str:
        """The URL with its host replaced by the checked address, without credentials (they go in
        `authorization`)."""
        return str(self.url.copy_with(host=str(self.address), username=None, password=None))

    @property
    def host_header(self) -> str:
        return self.url.netloc.decode("ascii")

    @property
    def authorization(self) -> str | None:
        """Basic credentials from the URL's user info, UTF-8 encoded; None without them."""
        if not self.url.userinfo:
            return None
        credentials = f"{self.url.username}:{self.url.password}".encode()
        return "Basic " + base64.b64encode(credentials).decode("ascii")

    @property
    def server_hostname(self) -> str | None:
        """The TLS server name (SNI and the certificate's name) stays the URL's host, as the
        connection names it (an internationalised name in its ASCII form)."""
        return self.url.raw_host.decode("ascii") if self.url.scheme == "https" else None


class AddressPolicy:
    def __init__(self, *, deny_private: bool, hosts: Mapping[str, str]) -> None:
        self._deny_private = deny_private
        self._hosts = {name.lower(): ipaddress.ip_address(address) for name, address in hosts.items()}

    @classmethod
    def of(cls, settings: CallbackSettings) -> AddressPolicy:
        return cls(deny_private=settings.deny_private, hosts=settings.hosts)

    async def resolve(self, url: str) -> Destination:
        """The checked destination of `url`; RefusedAddress when it may not be called.

        OSError when the host cannot be resolved now (worth trying again later).
        """
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise RefusedAddress(f"callback URL {url!r} is not a valid URL: {exc}") from exc
        if parsed.scheme not in {"http", "https"} or not parsed.host:
            raise RefusedAddress(f"callback URL {shown(url)!r} must be an absolute http:// or https:// URL")
        if parsed.port is not None and not 0 < parsed.port < _PORTS:
            port = f"has port {parsed.port}: ports run from 1 to {_PORTS - 1}"
            raise RefusedAddress(f"callback URL {shown(url)!r} {port}")
        if "%" in parsed.host:  # an IPv6 zone: no callback can be sent to one, and it hid a metadata address
            zone = "names an IPv6 zone (%), which a callback cannot be sent to"
            raise RefusedAddress(f"callback URL {shown(url)!r} {zone}")
        addresses = await self._addresses(parsed)
        for address in addresses:
            self._check(url, address)
        return Destination(parsed, addresses[0])

    async def _addresses(self, url: httpx.URL) -> list[IPAddress]:
        host = url.host
        try:
            return [_unmapped(ipaddress.ip_address(host))]
        except ValueError:
            pass
        if host.lower() in self._hosts:
            return [_unmapped(self._hosts[host.lower()])]
        port = url.port or (443 if url.scheme == "https" else 80)
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        found = [_unmapped(ipaddress.ip_address(info[4][0])) for info in infos]
        if not found:
            raise OSError(f"{host} resolves to no address")
        return found

    def _check(self, url: str, address: IPAddress) -> None:
        for checked in (address, *_embedded(address)):
            found = f"callback URL {shown(url)!r} resolves to " + (
                str(address) if checked is address else f"{address} ({checked})"
            )
            if checked in _METADATA or checked.is_link_local:
                raise RefusedAddress(f"{found}, a link-local or metadata address")
            if checked.is_unspecified or checked.is_multicast:
                raise RefusedAddress(f"{found}, which cannot receive a callback")
            if self._deny_private and (not checked.is_global or checked in _PROTOCOL_ASSIGNMENTS):
                raise RefusedAddress(
                    f"{found}, a loopback, private or otherwise non-public address "
                    "(refused: callbacks.deny_private is set)"
                )


def _embedded(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 one carries, by the translation schemes a network may route: NAT64
    (64:ff9b::/96, and the last 32 bits in the local-use 64:ff9b:1::/48), IPv4-compatible
    (::a.b.c.d) and 6to4 (2002::/16). Such an address reaches the IPv4 host where the scheme is
    deployed, so that host is checked too."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    last_32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    found = [last_32] if any(address in prefix for prefix in _CARRY_LAST_32) else []
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    return found


def _unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d) as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
