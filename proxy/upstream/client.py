"""Proxied exchanges: the request goes out, the response head comes back, the body is the relay's.

This module owns the upstream connections of proxied requests: an O(1) pool per origin (the
newest idle connection of the origin, checked with one ``poll`` that waits for nothing: a connection with
anything to read is never reused), the SSRF guard at connect (:mod:`proxy.upstream.connection`), TLS,
and the connection's HTTP/1.1 (:class:`~proxy.upstream.wire.UpstreamHTTP`: h11, or the fast implementation
that decides as h11 does) as the authority for the request head, the response head and keep-alive. A response
is handed to the relay with its raw connection; the relay reports whether the body ended
cleanly, and only then does the connection go back to the pool.

Why not httpx here: the performance notes (docs/performance.md) measured this shape of client best on every
figure (the pool scan, the per-chunk async iterators and the Request/Response objects were a
third of a small request's CPU and 9.6 KB per parked stream). httpx2 stays the HTTP client for
Parkway's own calls.
"""

from __future__ import annotations

import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from ..config import ServerConfig
from ..errors import UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeout
from ..http.parsers import resolve as resolve_parser
from ..sweep import FIRED, Sweep, tick_for
from .connection import UpstreamConnection
from .dns import DNSCache
from .response import HeadReader, Informational, StaleConnection, UpstreamResponse
from .ssrf import DEFAULT_POLICY, AddressPolicy, Resolver, check_scheme, resolve
from .tlssession import KeptSession
from .wire import RequestRefused

Headers = list[tuple[bytes, bytes]]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# The pool's clock: only idle ages are measured with it (one C call, where trio.current_time is three frames).
_monotonic = time.monotonic


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a connection goes and under which address policy (a pool key)."""

    scheme: str
    host: str
    port: int
    policy: AddressPolicy


class ConnectionPool:
    """Idle keep-alive connections per origin, newest last: taking and giving back are O(1)."""

    def __init__(self, *, max_idle_per_origin: int = 512, keepalive_expiry: float = 30.0):
        self.max_idle = max_idle_per_origin
        self.expiry = keepalive_expiry
        self._idle: dict[Origin, deque[UpstreamConnection]] = {}

    def take(self, origin: Origin, now: float) -> UpstreamConnection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if now - conn.idle_since > self.expiry or conn.has_unexpected_bytes():
                conn.close()
                continue
            return conn
        return None

    def give_back(self, origin: Origin, conn: UpstreamConnection, now: float) -> None:
        conn.http.start_next_cycle()
        conn.idle_since = now
        idle = self._idle.setdefault(origin, deque())
        idle.append(conn)
        if len(idle) > self.max_idle:
            idle.popleft().close()

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    url: str  # normalised, without fragment
    headers: Headers
    body: bytes | AsyncIterator[bytes] | None = None
    address_policy: AddressPolicy | None = None
    # Where 1xx heads other than 100 go (103 Early Hints, 102): the client's, when it may have them.
    informational: Informational | None = None


class _Exchange:
    """:meth:`UpstreamClient.open`: a class rather than an ``@asynccontextmanager``, whose async
    generator costs trio's first-iteration hook (a WeakSet entry) besides the generator itself."""

    __slots__ = ("client", "req", "scope", "now", "origin", "response")

    def __init__(self, client: UpstreamClient, req: UpstreamRequest, scope: trio.CancelScope | None, now: float):
        self.client, self.req, self.scope, self.now = client, req, scope, now

    async def __aenter__(self) -> UpstreamResponse:
        client, req, scope = self.client, self.req, self.scope
        origin, target, host_header = client._parse(req.url, req.address_policy or client.default_policy)
        first_bytes = client.first_bytes
        if scope is None or not first_bytes.running:  # (a client used outside the app: no sweep)
            with trio.move_on_after(client.first_byte_timeout) as waited:
                self.response = await client._exchange(req, origin, target, host_header)
            if waited.cancelled_caught:
                raise client._no_first_byte(origin)
        elif self.now + client.first_byte_timeout >= scope.deadline:  # the scope's own limit comes first
            self.response = await client._exchange(req, origin, target, host_header)
        else:
            # The caller's scope carries the first byte's deadline until the head: entered in the
            # client's sweep (a dict store and a del; it cancels the scope once the deadline has
            # passed and marks it FIRED there), not set on the scope (lowering and restoring a trio
            # deadline cost ~25 calls). A fired scope stays cancelled, so the wait is told from the mark.
            deadlines = first_bytes.deadlines
            deadlines[scope] = self.now + client.first_byte_timeout
            try:
                self.response = await client._exchange(req, origin, target, host_header)
            except trio.Cancelled:
                if deadlines[scope] == FIRED:
                    raise client._no_first_byte(origin) from None
                raise
            finally:
                fired = deadlines[scope] == FIRED
                del deadlines[scope]
            if fired:  # as the head arrived: late (the scope cannot be un-cancelled)
                self.response.conn.close()
                raise client._no_first_byte(origin)
        self.origin = origin
        if origin.scheme == "https" and origin not in client._sessions:
            # Taken at the head, not when the body ends: streams that open while this one
            # is still answering (a ramp of long SSE streams) resume instead of a full handshake.
            client._remember_session(origin, self.response.conn)
        return self.response

    async def __aexit__(self, *exc_info: object) -> None:
        client, origin, response = self.client, self.origin, self.response
        if response.reusable:
            client.pool.give_back(origin, response.conn, _monotonic())
        else:
            response.conn.close()


class UpstreamClient:
    """Sends proxied requests over pooled connections; see the module docstring."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        verify: bool | ssl.SSLContext = True,
        resolver: Resolver = resolve,
        pool: ConnectionPool | None = None,
    ):
        self.config = config
        self.connect_timeout = config.upstream_connect_timeout
        self.first_byte_timeout = config.upstream_first_byte_timeout
        self.idle_timeout = config.upstream_idle_timeout
        # The first byte's deadlines of requests that carry it on their own scope (open); the
        # app runs it. Its tick follows a reloaded first_byte_timeout.
        self.first_bytes = Sweep(lambda: tick_for(self.first_byte_timeout))
        self.parser = resolve_parser(config.http)  # h11 | httptools: HTTP/1.1 on new connections
        allow_private = config.allow_private_upstreams
        self.default_policy = AddressPolicy(allow_private=allow_private) if allow_private else DEFAULT_POLICY
        self.pool = pool or ConnectionPool()
        self._verify = verify
        self._ca_file = config.upstream_ca_file
        self._ssl: ssl.SSLContext | None = None
        # Host names resolved once per upstream_dns_ttl (the resolver given, e.g. a test's, behind it).
        self.dns = DNSCache(config.upstream_dns_ttl, resolver)
        self._sessions: dict[Origin, KeptSession] = {}  # the last TLS session per origin, to resume
        self.tls_full = 0  # TLS handshakes with upstreams, full and resumed (/metrics)
        self.tls_resumed = 0
        self._parsed: dict[tuple[str, AddressPolicy], tuple[Origin, bytes, bytes]] = {}

    def _parse(self, url: str, policy: AddressPolicy) -> tuple[Origin, bytes, bytes]:
        """:func:`parse_url`, remembered per URL and policy (a proxied URL repeats: its parse
        cost a small request as much as writing its head). Refusals are not remembered."""
        key = (url, policy)
        parsed = self._parsed.get(key)
        if parsed is None:
            parsed = parse_url(url, policy)
            if len(self._parsed) >= _PARSED_MAX:
                self._parsed.clear()
            self._parsed[key] = parsed
        return parsed

    def apply(self, config: ServerConfig) -> None:
        """Take a reloaded ``[server]`` for new requests: the upstream timeouts, the private-address
        default and the CA file. A new CA drops the idle connections and TLS sessions made under
        the old one; requests in flight keep what they started with."""
        self.config = config
        self.connect_timeout = config.upstream_connect_timeout
        self.first_byte_timeout = config.upstream_first_byte_timeout
        self.idle_timeout = config.upstream_idle_timeout
        self.parser = resolve_parser(config.http)  # new connections; pooled ones keep theirs (same answers)
        if config.upstream_dns_ttl != self.dns.ttl:
            self.dns.ttl = config.upstream_dns_ttl
            self.dns.clear()
        allow_private = config.allow_private_upstreams
        self.default_policy = AddressPolicy(allow_private=allow_private) if allow_private else DEFAULT_POLICY
        if config.upstream_ca_file != self._ca_file:
            self._ca_file = config.upstream_ca_file
            self._ssl = None
            self._sessions.clear()
            self.pool.close()

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The certificate checks of every upstream, for the WebSocket ones too (proxy.websocket.session)."""
        return self._ssl_context()

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            if isinstance(self._verify, ssl.SSLContext):
                self._ssl = self._verify
            elif self._ca_file and self._verify:  # a private CA instead of the system's
                self._ssl = ssl.create_default_context(cafile=self._ca_file)
            else:
                import httpx2  # the same certificate store and defaults as Parkway's own httpx2 calls

                self._ssl = httpx2.create_ssl_context(verify=self._verify, trust_env=False)
        return self._ssl

    def open(self, req: UpstreamRequest, scope: trio.CancelScope | None = None, now: float = 0.0) -> _Exchange:
        """Send ``req``; ``async with`` it to get the response once its head has arrived. Leaving
        the context gives the connection back to the pool when the relay marked the response
        reusable, and closes it otherwise (an unfinished body: that stops the generation upstream).

        ``scope``: the caller's enclosing cancel scope (the request's overall one), which then carries
        the first-byte timeout counted from ``now`` (the caller's clock reading) instead of a scope of
        its own: :attr:`first_bytes` cancels it within a tick after the timeout (when that sweep is
        not running, the exchange has a scope of its own, exact). A first byte that comes too late
        raises :class:`UpstreamTimeout` here either way; the caller's scope is then cancelled too,
        and whoever catches its cancellation must answer with this error (gateway.handler does,
        through the request's record)."""
        return _Exchange(self, req, scope, now)

    def _no_first_byte(self, origin: Origin) -> UpstreamTimeout:
        return UpstreamTimeout(f"{origin.host}:{origin.port} sent no response within {self.first_byte_timeout:g} s")

    def _remember_session(self, origin: Origin, conn: UpstreamConnection) -> None:
        """Keep one TLS session per origin for every new connection to resume (a private copy,
        :mod:`proxy.upstream.tlssession`: taken once, and forgotten when a handshake did not resume
        it; the next answer's session replaces it)."""
        session = conn.tls_session
        if session is not None:
            self._sessions[origin] = session

    async def _exchange(self, req: UpstreamRequest, origin: Origin, target: bytes, host: bytes) -> UpstreamResponse:
        first, rest = b"", None
        if isinstance(req.body, AsyncIterator):
            # The first chunk is held, so a request whose connection is found dead before any
            # byte of it went out can still be sent whole on another (the rest is not read yet).
            rest = req.body
            first = await anext(rest, b"")
        conn = self.pool.take(origin, _monotonic())
        if conn is not None:
            before = conn.sent
            try:
                return await self._send_and_read_head(conn, req, target, host, first, rest)
            except StaleConnection:
                conn.close()
                if not may_retry(req.method, written=conn.sent != before, streamed=rest is not None):
                    raise UpstreamProtocolError(
                        f"{conn.host} closed a kept-alive connection before answering; "
                        f"a {req.method} request is not sent twice"
                    ) from None
        https = origin.scheme == "https"
        try:
            conn = await UpstreamConnection.connect(
                origin.host,
                origin.port,
                policy=origin.policy,
                ssl_context=self._ssl_context() if https else None,
                timeout=self.connect_timeout,
                resolver=self.dns,
                tls_session=self._sessions.get(origin) if https else None,  # (an Origin's hash is two Python calls)
                parser=self.parser,
            )
        except (UpstreamConnectError, UpstreamTimeout):
            self.dns.forget(origin.host, origin.port)  # no kept address took it: ask the resolver next time
            raise
        if conn.tls:
            if conn.tls_resumed:
                self.tls_resumed += 1
            else:
                self.tls_full += 1
                self._sessions.pop(origin, None)  # expired or refused: the next answer's session replaces it
        try:
            return await self._send_and_read_head(conn, req, target, host, first, rest)
        except StaleConnection as exc:
            conn.close()
            raise UpstreamProtocolError(str(exc)) from None

    async def _send_and_read_head(
        self,
        conn: UpstreamConnection,
        req: UpstreamRequest,
        target: bytes,
        host: bytes,
        first: bytes,
        rest: AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """Send the request while watching for an early answer, then read the answer's head."""
        heads = HeadReader(conn, req.method, self.idle_timeout, req.informational)
        headers = [(b"host", host), *req.headers]
        given = req.headers  # a length, when given, is usually the last header (proxy.forwarding)
        has_length = bool(given) and given[-1][0] == b"content-length" or any(n == b"content-length" for n, _ in given)
        body = req.body
        if isinstance(body, bytes):
            if not has_length:
                headers.append((b"content-length", str(len(body)).encode()))
        elif rest is not None:
            if not has_length:
                headers.append((b"transfer-encoding", b"chunked"))
        elif req.method in _BODY_METHODS and not has_length:
            headers.append((b"content-length", b"0"))
        http = conn.http
        try:
            data = http.request(req.method, target, headers)
            if rest is None:
                if isinstance(body, bytes) and body:
                    data += http.data(body)
                data += http.end()
                early = await heads.send(data)
            else:
                early = await self._send_streamed(heads, data, first, rest)
            return early or heads.final or await heads.read()
        except RequestRefused as exc:
            conn.close()
            raise UpstreamError(f"request to {conn.host} could not be sent: {exc}") from None
        except StaleConnection:
            raise
        except BaseException:
            conn.close()
            raise

    @staticmethod
    async def _send_streamed(
        heads: HeadReader, data: bytes, first: bytes, rest: AsyncIterator[bytes]
    ) -> UpstreamResponse | None:
        """Send a streamed body after its head; the early answer that stops it, if any."""
        http = heads.conn.http
        # The head goes out with the body's first chunk (usually the whole of a small body).
        if first:
            data += http.data(first)
        early = await heads.send(data)
        if early is not None:
            return early
        async for chunk in rest:
            if chunk:
                early = await heads.send(http.data(chunk), peek=True)
                if early is not None:
                    return early
        end = http.end()
        return await heads.send(end) if end else None

    async def aclose(self) -> None:
        self.pool.close()


IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})  # RFC 9110 §9.2.2


def may_retry(method: str, *, written: bool, streamed: bool) -> bool:
    """Whether a request whose kept-alive connection failed before any answer may go again on a
    new one. Always when none of it was written (the connection was dead before use); else
    only an idempotent method (RFC 9110 §9.2.2: a proxy MUST NOT retry a non-idempotent one, a
    POST to an LLM is a second bill) whose body is held whole (a streamed body cannot be replayed)."""
    return not written or (method in IDEMPOTENT and not streamed)


_PARSED_MAX = 1024  # URLs remembered by UpstreamClient._parse: a bound, not a working set


def parse_url(url: str, policy: AddressPolicy) -> tuple[Origin, bytes, bytes]:
    """Origin, request-target and Host header of a normalised URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise UpstreamError(f"invalid upstream URL: {exc}") from None
    check_scheme(parts.scheme)
    if not host:
        raise UpstreamError("invalid upstream URL: no host")
    scheme = parts.scheme.lower()
    default = 443 if scheme == "https" else 80
    netloc = parts.netloc.rsplit("@", 1)[-1]
    target = (parts.path or "/") + (f"?{parts.query}" if "?" in url else "")
    try:
        encoded = target.encode("ascii"), netloc.encode("ascii")
    except UnicodeEncodeError:
        raise UpstreamError("invalid upstream URL: not ASCII") from None
    return Origin(scheme, host, port or default, policy), *encoded


__all__ = [
    "ConnectionPool",
    "Informational",
    "Origin",
    "UpstreamClient",
    "UpstreamRequest",
    "UpstreamResponse",
    "may_retry",
]
