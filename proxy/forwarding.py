"""Header policy for both directions of the proxy. Pure functions over header lists.

Request side: hop-by-hop headers and anything naming the client's own connection to
Parkway are dropped, the browser's cookies for Parkway's site are never passed on, and the
credential's injected headers replace whatever the client sent under the same names.
Response side: only hop-by-hop headers go; everything else reaches the browser unchanged.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import NamedTuple

from .errors import BadRequest

Headers = list[tuple[bytes, bytes]]  # (name, value) pairs as h11 and httpx carry them; the one alias

# RFC 9110 7.6.1 hop-by-hop fields, plus the legacy ones proxies still see.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Not forwarded upstream: set by Parkway itself (host, framing, forwarding chain), or private
# to the browser's relationship with Parkway's site (cookies would leak the app's session).
REQUEST_DROPPED = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",  # 100-continue is answered by Parkway itself; httpx does not speak it
    b"cookie",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-prefix",
    b"x-real-ip",
}

# Not passed back: framing is redone by h11 for the client's connection (content-length
# is kept when the upstream sent one, see :func:`response_headers`).
RESPONSE_DROPPED = HOP_BY_HOP | {b"set-cookie", b"set-cookie2"}


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names the sender declared hop-by-hop in ``Connection`` (RFC 9110 7.6.1).

    ``headers`` have lower-case names: a client's as the head was read, an upstream's as
    :func:`response_headers` lowers them first."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update([t.strip().lower() for t in value.split(b",") if t.strip()])
    return tokens


def check_connection_header(
    client: Iterable[tuple[bytes, bytes]], signed: Iterable[str], injected: Iterable[tuple[str, str]]
) -> None:
    """Refuse (400) a request whose ``Connection`` header names a signed or an injected header.

    Every header named in ``Connection`` is dropped before forwarding (RFC 9110 7.6.1), so a
    client could otherwise verify a signature with a header and then have it stripped: a
    signed header must reach the upstream exactly as signed. Repeated ``Connection`` headers,
    any case and any spacing count alike.
    """
    listed_tokens = _connection_tokens(client)
    if not listed_tokens:  # the common case: nothing listed, nothing to compare
        return
    tokens = {t.decode("latin-1") for t in listed_tokens}
    named = sorted(tokens & ({n.lower() for n in signed} | {n.lower() for n, _ in injected}))
    if named:
        listed = ", ".join(named)
        raise BadRequest(
            f"the Connection header lists {listed}, which must reach the upstream as signed "
            "(or as this credential sets it): remove it from Connection",
            code="signed_header_in_connection",
        )


class ForwardContext(NamedTuple):
    """Who the client is, as far as Parkway can trust it, for ``X-Forwarded-*`` and logs.

    Immutable; a tuple because one is built per request (as gateway.plan.Plan: a frozen
    dataclass sets each field through ``object.__setattr__``)."""

    client_ip: str
    proto: str = "http"
    forwarded_for: str = ""  # the X-Forwarded-For chain to send upstream
    prefix: str = ""  # public path prefix reported by a trusted proxy (X-Forwarded-Prefix)


@lru_cache(maxsize=64)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _is_trusted(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in n for n in networks)


@lru_cache(maxsize=1024)  # one lookup: a client's requests (a connection's, a host's) share one
def _direct(peer: str) -> ForwardContext:
    """The context of a client that reached Parkway directly: its own address, nothing believed."""
    return ForwardContext(client_ip=peer, forwarded_for=peer)


def forward_context(peer: str, headers: Mapping[str, str], trusted_proxies: tuple[str, ...]) -> ForwardContext:
    """Believe ``X-Forwarded-For/Proto/Prefix`` only when the peer is a trusted proxy.

    The client is the right-most address in the chain that is not itself a trusted proxy:
    everything left of it could have been written by the client.
    """
    if not trusted_proxies:  # the common case: no address to parse, nothing to believe
        return _direct(peer)
    networks = _networks(trusted_proxies)
    if not _is_trusted(peer, networks):
        return _direct(peer)
    chain = [a.strip() for a in headers.get("x-forwarded-for", "").split(",") if a.strip()]
    client = peer
    for address in reversed(chain):
        client = address
        if not _is_trusted(address, networks):
            break
    proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    prefix = headers.get("x-forwarded-prefix", "").split(",")[0].strip()
    if not prefix.startswith("/") or any(c.isspace() or c in "?#" for c in prefix):
        prefix = ""
    return ForwardContext(
        client_ip=client,
        proto=proto if proto in ("http", "https") else "http",
        forwarded_for=", ".join([*chain, peer]),
        prefix=prefix.rstrip("/"),
    )


def forwarded_client_headers(
    client: Iterable[tuple[bytes, bytes]], overridden: set[bytes] | frozenset[bytes]
) -> Headers:
    """The client's own headers that reach the upstream: not hop-by-hop, not named in its
    ``Connection``, not Parkway's (``X-Sw-*``, framing, forwarding chain, cookies), not one the
    credential injects (``overridden``, lower case). The cache keys exactly these."""
    client = list(client)
    tokens = _connection_tokens(client)
    dropped = REQUEST_DROPPED | tokens if tokens else REQUEST_DROPPED
    return [(n, v) for n, v in client if n not in dropped and n not in overridden and not n.startswith(b"x-sw-")]


@lru_cache(maxsize=256)
def _injected(injected: tuple[tuple[str, str], ...]) -> tuple[Headers, frozenset[bytes]]:
    """A credential's injected headers as sent, and their names (cached: a credential's are fixed)."""
    pairs = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in injected]
    return pairs, frozenset(n for n, _ in pairs)


def request_headers(
    client: Iterable[tuple[bytes, bytes]],
    injected: Iterable[tuple[str, str]],
    ctx: ForwardContext,
    *,
    content_length: int | None = None,
) -> Headers:
    """Headers to send upstream.

    ``content_length`` is set when the body is known (a verified signed body, or the
    client's fixed length for a streamed one); otherwise the upstream client frames it.
    """
    injected_pairs, injected_names = _injected(tuple(injected))
    out = forwarded_client_headers(client, injected_names)
    out.extend(injected_pairs)
    # The chain is header text from trusted proxies, decoded as UTF-8 where it was valid.
    out.append((b"x-forwarded-for", (ctx.forwarded_for or ctx.client_ip).encode("utf-8")))
    out.append((b"x-forwarded-proto", ctx.proto.encode("latin-1")))
    if content_length is not None:
        out.append((b"content-length", str(content_length).encode()))
    return out


def response_headers(upstream: Iterable[tuple[bytes, bytes]], *, lowered: bool = False) -> Headers:
    """Headers to send to the client: the upstream's, minus hop-by-hop and cookies.

    Cookies set by an API upstream would land on Parkway's (the app's) domain, so they are
    dropped rather than handed to the browser. ``lowered``: the names are lower-case already
    (an :class:`~proxy.upstream.wire.ResponseHead`'s), so not lowered again (a call per header).
    """
    if not lowered:
        upstream = [(n.lower(), v) for n, v in upstream]
    tokens = _connection_tokens(upstream)
    dropped = RESPONSE_DROPPED | tokens if tokens else RESPONSE_DROPPED
    return [(n, v) for n, v in upstream if n not in dropped]


# Never taken from a trailer section (RFC 9110 §6.5.1: framing, routing, content metadata and
# response control belong in the head), besides what the head's policy drops.
TRAILER_DROPPED = RESPONSE_DROPPED | {
    b"content-length",
    b"content-encoding",
    b"content-type",
    b"content-range",
    b"host",
    b"cache-control",
    b"expires",
    b"location",
    b"retry-after",
    b"vary",
    b"www-authenticate",
}


def response_trailers(lines: Iterable[bytes]) -> list[bytes]:
    """The trailer field lines (``name: value\\r\\n``, as received) the client may see: the
    head's policy (no hop-by-hop field, no cookie) plus the fields a trailer must not carry."""
    return [line for line in lines if line.partition(b":")[0].strip().lower() not in TRAILER_DROPPED]


def is_event_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for n, v in headers:  # a loop, not any() over a generator: one call, not one per header
        if n == b"content-type" and v.lower().startswith(b"text/event-stream"):
            return True
    return False
