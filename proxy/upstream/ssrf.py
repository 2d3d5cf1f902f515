"""SSRF guard: upstream connections only to addresses the operator allows.

A signed URL names its upstream, and a credential with a broad ``allowed_upstreams`` (or
none) would let a signer, or whoever obtained a signer's help, make Parkway call into the
operator's own network. So by default Parkway connects only to public addresses:

* loopback, private (RFC 1918, CGNAT, ULA) and link-local addresses need
  ``allow_private_upstreams`` (per credential, or ``--allow-private-upstreams``), or the
  address listed in the credential's ``allowed_upstreams`` (``http://10.0.0.5:8000/``);
* cloud metadata addresses (169.254.169.254 and kin) are refused even then, unless that very
  address is listed;
* unspecified, multicast and reserved addresses are refused unless listed.

The pure core is :func:`classify` and :func:`check_address`. The check is enforced where the
socket is opened, in the same way on both of Parkway's clients: the host is resolved once,
every address is checked, and the checked address itself is connected to, so a DNS answer
that changes between check and connect (rebinding) cannot slip through; TLS still verifies
the certificate against the host name. Proxied requests connect in
:meth:`proxy.upstream.connection.UpstreamConnection.connect`; Parkway's own httpx2 calls
(:mod:`proxy.upstream.outbound`) through :class:`GuardedBackend`, an httpcore network backend given to
each of its connection pools (one per policy).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import httpcore2 as httpcore  # httpx2's connection pool, which takes this backend
import trio

from ..errors import Forbidden

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressKind(StrEnum):
    PUBLIC = "public"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    LINK_LOCAL = "link-local"
    METADATA = "cloud metadata"
    UNSPECIFIED = "unspecified"
    MULTICAST = "multicast"
    RESERVED = "reserved"


# Instance metadata and credential endpoints reachable from inside clouds.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle ... IMDS
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.170.23",  # AWS EKS Pod Identity
        "fd00:ec2::23",  # AWS EKS Pod Identity over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure WireServer (a public address, still the host's own service)
        "192.0.0.192",  # Oracle Cloud (legacy)
    )
)

_NETWORKS: tuple[tuple[AddressKind, tuple[IPNetwork, ...]], ...] = tuple(
    (kind, tuple(ipaddress.ip_network(n) for n in nets))
    for kind, nets in (
        (AddressKind.UNSPECIFIED, ("0.0.0.0/8", "::/128")),  # Linux connects 0.0.0.0 to the local host
        (AddressKind.LOOPBACK, ("127.0.0.0/8", "::1/128")),
        (AddressKind.LINK_LOCAL, ("169.254.0.0/16", "fe80::/10")),
        (AddressKind.MULTICAST, ("224.0.0.0/4", "ff00::/8")),
        (
            AddressKind.PRIVATE,
            ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7", "fec0::/10"),
        ),
        (
            AddressKind.RESERVED,
            (
                "192.0.0.0/24",
                "192.0.2.0/24",
                "198.18.0.0/15",
                "198.51.100.0/24",
                "203.0.113.0/24",
                "240.0.0.0/4",
                "100::/64",
                "2001::/23",
                "2001:db8::/32",
            ),
        ),  # fmt: skip
    )
)
# IPv6 forms that carry an IPv4 address a router or the kernel may deliver to.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def parse_ip(value: str | IPAddress) -> IPAddress:
    """An address from text as sockets report it (``fe80::1%eth0`` keeps its scope) or as is."""
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    return ipaddress.ip_address(value.strip("[]"))


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4, compatible), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _plain(ip: IPAddress) -> IPAddress:
    """``ip`` without its IPv6 scope (``%eth0``), which networks cannot be compared with."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return ipaddress.IPv6Address(ip.compressed.split("%")[0])
    return ip


def classify(ip: str | IPAddress) -> AddressKind:
    """What kind of address ``ip`` is; an IPv6 address carrying an IPv4 one is judged by the
    more restricted of the two."""
    ip = _plain(parse_ip(ip))
    inner = embedded_ipv4(ip)
    if inner is not None:
        kind = classify(inner)
        if kind is not AddressKind.PUBLIC:
            return kind
    if ip in METADATA_ADDRESSES:
        return AddressKind.METADATA
    for kind, networks in _NETWORKS:
        if any(ip in net for net in networks if net.version == ip.version):
            return kind
    if not ip.is_global:
        return AddressKind.RESERVED
    return AddressKind.PUBLIC


_ALLOWED_BY_FLAG = frozenset({AddressKind.LOOPBACK, AddressKind.PRIVATE, AddressKind.LINK_LOCAL})


def _networks(explicitly_allowed: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(a.strip("[]"), strict=False) for a in explicitly_allowed)


def _listed(ip: IPAddress, networks: tuple[IPNetwork, ...], exact: bool) -> bool:
    candidates = [ip] + ([inner] if (inner := embedded_ipv4(ip)) is not None else [])
    for net in networks:
        for candidate in candidates:
            if net.version != candidate.version:
                continue
            if exact and net.num_addresses == 1 and net.network_address == candidate:
                return True
            if not exact and candidate in net:
                return True
    return False


def _check(ip: IPAddress, allow_private: bool, networks: tuple[IPNetwork, ...], host: str | None) -> None:
    ip = _plain(ip)
    kind = classify(ip)
    if kind is AddressKind.PUBLIC:
        return
    if kind is AddressKind.METADATA:
        # Only the address itself, never a range that happens to contain it.
        if _listed(ip, networks, exact=True):
            return
    elif _listed(ip, networks, exact=False):
        return
    elif kind in _ALLOWED_BY_FLAG and allow_private:
        return
    what = f"{ip}, a {kind.value} address" if host is None or _is_ip(host) else f"a {kind.value} address"
    target = f"upstream {host}" if host else "the upstream"
    if kind is AddressKind.METADATA:
        how = "only listing this exact address in allowed_upstreams allows it"
    elif kind in _ALLOWED_BY_FLAG:
        how = "allow it with allow_private_upstreams = true or by listing the address in allowed_upstreams"
    else:
        how = "only listing the address in allowed_upstreams allows it"
    resolves = "is" if host is None or _is_ip(host) else "resolves to"
    raise Forbidden(f"{target} {resolves} {what}: refused ({how})", code="upstream_address_refused")


def check_address(
    ip: str | IPAddress,
    *,
    allow_private: bool,
    explicitly_allowed: Collection[str] = (),
    host: str | None = None,
) -> None:
    """Raise ``Forbidden(code="upstream_address_refused")`` unless Parkway may connect to ``ip``.

    ``explicitly_allowed`` holds addresses or CIDR networks; a metadata address counts as
    listed only when it is listed as itself. ``host`` (what the URL named) makes the message clearer.
    """
    _check(parse_ip(ip), allow_private, _networks(explicitly_allowed), host)


def _is_ip(host: str) -> bool:
    try:
        parse_ip(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Where one credential's requests may connect; hashable, so it can key connection pools."""

    allow_private: bool = False
    explicitly_allowed: frozenset[str] = frozenset()  # canonical addresses or networks
    _nets: tuple[IPNetwork, ...] = field(default=(), init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        nets = _networks(self.explicitly_allowed)
        object.__setattr__(self, "explicitly_allowed", frozenset(str(n) for n in nets))
        object.__setattr__(self, "_nets", nets)

    # Addresses this policy allowed (a verdict depends on the address and the policy only): a
    # fresh connection to one of them skips parsing and classifying it again. Refusals are
    # never remembered; at most _ALLOWED_MAX entries, cleared when full.
    _allowed: set[str | IPAddress] = field(default_factory=set, init=False, repr=False, compare=False, hash=False)

    def check(self, ip: str | IPAddress, host: str | None = None) -> None:
        allowed = self._allowed
        if ip in allowed:
            return
        _check(parse_ip(ip), self.allow_private, self._nets, host)
        if len(allowed) >= _ALLOWED_MAX:
            allowed.clear()
        allowed.add(ip)


_ALLOWED_MAX = 256  # addresses remembered per policy as allowed (a policy per credential, 256 of them: plan.py)


DEFAULT_POLICY = AddressPolicy()


def explicit_addresses(allowed_upstreams: Iterable[str]) -> frozenset[str]:
    """The IP-literal hosts among a credential's ``allowed_upstreams`` URL prefixes."""
    found = set()
    for prefix in allowed_upstreams:
        try:
            host = urlsplit(prefix).hostname
        except ValueError:
            continue
        if host and _is_ip(host):
            found.add(str(_plain(parse_ip(host))))
    return frozenset(found)


def policy_for(*, allow_private: bool, allowed_upstreams: Iterable[str] = ()) -> AddressPolicy:
    """The policy of a credential: its flag (or the server's) and its listed addresses."""
    return AddressPolicy(allow_private, explicit_addresses(allowed_upstreams))


def check_scheme(scheme: str) -> None:
    if scheme.lower() not in ("http", "https"):
        raise Forbidden(f"upstream scheme {scheme!r} is refused: only http and https", code="upstream_scheme_refused")


# --- enforcement at connect time ------------------------------------------------------------------

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to for a TCP connection, in the resolver's order."""
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolve, check every address, connect only to a checked address (never the name again)."""

    def __init__(
        self, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend | None = None, resolver: Resolver = resolve
    ):
        self.policy = policy
        self._inner = inner or httpcore.TrioBackend()
        self._resolve = resolver

    async def _addresses(self, host: str, port: int, deadline: float) -> list[str]:
        if _is_ip(host):
            return [host.strip("[]")]
        try:
            with trio.fail_at(deadline):
                addresses = await self._resolve(host, port)
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from None
        if not addresses:
            raise httpcore.ConnectError(f"{host} has no address")
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        addresses = await self._addresses(host, port, deadline)
        for address in addresses:  # all of them: a mixed answer is refused, not filtered
            self.policy.check(address, host=host)
        error: Exception | None = None
        for address in addresses:
            remaining = None if deadline == math.inf else deadline - trio.current_time()
            if remaining is not None and remaining <= 0:
                raise httpcore.ConnectTimeout(f"connecting to {host} timed out")
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=remaining, local_address=local_address, socket_options=socket_options
                )
            except httpcore.ConnectError as exc:  # try the next address, as open_tcp_stream would
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not upstreams")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
