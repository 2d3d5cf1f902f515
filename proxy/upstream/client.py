"""Proxied exchanges: the request goes out, the response head comes back, the body is the relay's.

This module owns the upstream connections of proxied requests: an O(1) pool per origin (the
newest idle connection of the origin, checked with one ``recv(MSG_PEEK)``: a connection with
anything to read is never reused), the SSRF guard at connect (:mod:`proxy.upstream.connection`), TLS,
and h11 as the authority for the request head, the response head and keep-alive. A response
is handed to the relay with its raw connection; the relay reports whether the body ended
cleanly, and only then does the connection go back to the pool.

Why not httpx here: the performance notes (docs/performance.md) measured this shape of client best on every
figure (the pool scan, the per-chunk async iterators and the Request/Response objects were a
third of a small request's CPU and 9.6 KB per parked stream). httpx2 stays the HTTP client for
Parkway's own calls.
"""

from __future__ import annotations

import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from ..config import ServerConfig
from ..errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout
from ..http.chunked import Framing, body_framing
from .connection import UpstreamConnection
from .ssrf import DEFAULT_POLICY, AddressPolicy, Resolver, check_scheme, resolve

Headers = list[tuple[bytes, bytes]]

MAX_HEAD = 65536
_HEAD_END = re.compile(rb"\n\r?\n")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


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
        conn.h11.start_next_cycle()
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


Informational = Callable[[int, Headers], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    url: str  # normalised, without fragment
    headers: Headers
    body: bytes | AsyncIterator[bytes] | None = None
    address_policy: AddressPolicy | None = None
    # Where 1xx heads other than 100 go (103 Early Hints, 102): the client's, when it may have them.
    informational: Informational | None = None


class UpstreamResponse:
    """An upstream answer whose head has arrived: status, headers, framing, the raw connection.

    ``initial`` holds the body bytes that arrived with the head. The relay sets ``reusable``
    when the body ended cleanly with nothing after it.
    """

    __slots__ = ("conn", "content_type", "framing", "headers", "idle_timeout", "initial", "reusable", "status")

    def __init__(self, status: int, headers: Headers, framing: Framing, conn: UpstreamConnection, initial: bytes,
                 idle_timeout: float):  # fmt: skip
        self.status = status
        if framing.kind == "chunked":  # RFC 9112 6.1: the chunks frame it, a Content-Length beside them goes
            headers = [(n, v) for n, v in headers if n != b"content-length"]
        self.headers = headers
        self.content_type = next((v.decode("latin-1") for n, v in headers if n == b"content-type"), "")
        self.framing = framing
        self.conn = conn
        self.initial = initial
        self.idle_timeout = idle_timeout
        self.reusable = False


class _Exchange:
    """:meth:`UpstreamClient.open`: a class rather than an ``@asynccontextmanager``, whose async
    generator costs trio's first-iteration hook (a WeakSet entry) besides the generator itself."""

    __slots__ = ("client", "req", "origin", "response")

    def __init__(self, client: UpstreamClient, req: UpstreamRequest):
        self.client, self.req = client, req

    async def __aenter__(self) -> UpstreamResponse:
        client, req = self.client, self.req
        origin, target, host_header = _parse(req.url, req.address_policy or client.default_policy)
        with trio.move_on_after(client.first_byte_timeout) as scope:
            self.response = await client._exchange(req, origin, target, host_header)
            self.origin = origin
        if scope.cancelled_caught:
            raise UpstreamTimeout(
                f"{origin.host}:{origin.port} sent no response within {client.first_byte_timeout:g} s"
            )
        if origin.scheme == "https" and origin not in client._sessions:
            # Taken at the head, not when the body ends: streams that open while this one
            # is still answering (a ramp of long SSE streams) resume instead of a full handshake.
            client._remember_session(origin, self.response.conn)
        return self.response

    async def __aexit__(self, *exc_info: object) -> None:
        client, origin, response = self.client, self.origin, self.response
        if response.reusable:
            client.pool.give_back(origin, response.conn, trio.current_time())
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
        allow_private = config.allow_private_upstreams
        self.default_policy = AddressPolicy(allow_private=allow_private) if allow_private else DEFAULT_POLICY
        self.pool = pool or ConnectionPool()
        self._verify = verify
        self._ca_file = config.upstream_ca_file
        self._ssl: ssl.SSLContext | None = None
        self._resolver = resolver
        self._sessions: dict[Origin, ssl.SSLSession] = {}  # the last TLS session per origin, to resume
        self.tls_full = 0  # TLS handshakes with upstreams, full and resumed (/metrics)
        self.tls_resumed = 0

    def apply(self, config: ServerConfig) -> None:
        """Take a reloaded ``[server]`` for new requests: the upstream timeouts, the private-address
        default and the CA file. A new CA drops the idle connections and TLS sessions made under
        the old one; requests in flight keep what they started with."""
        self.config = config
        self.connect_timeout = config.upstream_connect_timeout
        self.first_byte_timeout = config.upstream_first_byte_timeout
        self.idle_timeout = config.upstream_idle_timeout
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

    def open(self, req: UpstreamRequest) -> _Exchange:
        """Send ``req``; ``async with`` it to get the response once its head has arrived. Leaving
        the context gives the connection back to the pool when the relay marked the response
        reusable, and closes it otherwise (an unfinished body: that stops the generation upstream)."""
        return _Exchange(self, req)

    def _remember_session(self, origin: Origin, conn: UpstreamConnection) -> None:
        """Keep one TLS session per origin for every new connection to resume (reading it costs
        as much as relaying several events, so it is taken once and forgotten when a handshake
        did not resume it; the next answer's session replaces it)."""
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
        conn = self.pool.take(origin, trio.current_time())
        if conn is not None:
            before = conn.sent
            try:
                return await self._send_and_read_head(conn, req, target, host, first, rest)
            except _StaleConnection:
                conn.close()
                if not may_retry(req.method, written=conn.sent != before, streamed=rest is not None):
                    raise UpstreamProtocolError(
                        f"{conn.host} closed a kept-alive connection before answering; "
                        f"a {req.method} request is not sent twice"
                    ) from None
        conn = await UpstreamConnection.connect(
            origin.host,
            origin.port,
            policy=origin.policy,
            ssl_context=self._ssl_context() if origin.scheme == "https" else None,
            timeout=self.connect_timeout,
            resolver=self._resolver,
            tls_session=self._sessions.get(origin),
        )
        if conn.tls:
            if conn.tls_resumed:
                self.tls_resumed += 1
            else:
                self.tls_full += 1
                self._sessions.pop(origin, None)  # expired or refused: the next answer's session replaces it
        try:
            return await self._send_and_read_head(conn, req, target, host, first, rest)
        except _StaleConnection as exc:
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
        heads = _HeadReader(conn, req.method, self.idle_timeout, req.informational)
        try:
            early = await self._send_request(conn, req, target, host, first, rest, heads)
            return early or heads.final or await heads.read()
        except _StaleConnection:
            raise
        except BaseException:
            conn.close()
            raise

    async def _send_request(
        self,
        conn: UpstreamConnection,
        req: UpstreamRequest,
        target: bytes,
        host: bytes,
        first: bytes,
        rest: AsyncIterator[bytes] | None,
        heads: _HeadReader,
    ) -> UpstreamResponse | None:
        """Send the request while watching for an early answer; the answer that stops the body, if any."""
        headers = [(b"host", host), *req.headers]
        has_length = any(n == b"content-length" for n, _ in req.headers)
        body = req.body
        if isinstance(body, bytes):
            if not has_length:
                headers.append((b"content-length", str(len(body)).encode()))
        elif rest is not None:
            if not has_length:
                headers.append((b"transfer-encoding", b"chunked"))
        elif req.method in _BODY_METHODS and not has_length:
            headers.append((b"content-length", b"0"))
        h = conn.h11
        try:
            data = h.send(h11.Request(method=req.method, target=target, headers=headers))
            if rest is None:
                if isinstance(body, bytes) and body:
                    data += h.send(h11.Data(data=body))
                data += h.send(h11.EndOfMessage())
                return await heads.send(data)
            # The head goes out with the body's first chunk (usually the whole of a small body).
            if first:
                data += h.send(h11.Data(data=first))
            early = await heads.send(data)
            if early is not None:
                return early
            async for chunk in rest:
                if chunk:
                    early = await heads.send(h.send(h11.Data(data=chunk)), peek=True)
                    if early is not None:
                        return early
            end = h.send(h11.EndOfMessage())
            return await heads.send(end) if end else None
        except h11.LocalProtocolError as exc:
            raise UpstreamError(f"request to {conn.host} could not be sent: {exc}") from None

    async def aclose(self) -> None:
        self.pool.close()


IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})  # RFC 9110 §9.2.2


def may_retry(method: str, *, written: bool, streamed: bool) -> bool:
    """Whether a request whose kept-alive connection failed before any answer may go again on a
    new one. Always when none of it was written (the connection was dead before use); else
    only an idempotent method (RFC 9110 §9.2.2: a proxy MUST NOT retry a non-idempotent one, a
    POST to an LLM is a second bill) whose body is held whole (a streamed body cannot be replayed)."""
    return not written or (method in IDEMPOTENT and not streamed)


class _StaleConnection(Exception):
    """A connection failed before any byte of the response: a kept-alive one may be retried."""


class _HeadReader:
    """The response heads of one exchange, read while the request goes out and after it.

    Informational (1xx) heads are handed to ``informational`` (100 Continue and 101 excepted)
    and skipped; the final head becomes the :class:`UpstreamResponse`. Every head is limited
    to :data:`MAX_HEAD` bytes, however it arrived.
    """

    __slots__ = ("buf", "conn", "final", "idle_timeout", "informational", "method", "received", "version")

    def __init__(
        self,
        conn: UpstreamConnection,
        method: str,
        idle_timeout: float,
        informational: Informational | None,
    ):
        self.conn = conn
        self.method = method
        self.idle_timeout = idle_timeout
        self.informational = informational
        self.buf = b""
        self.received = False
        self.version = b"1.1"  # the final head's HTTP version
        self.final: UpstreamResponse | None = None  # an early answer that still wants the body

    async def send(self, data: bytes, *, peek: bool = False) -> UpstreamResponse | None:
        """Send ``data`` of the request; an early final answer that asks to stop it is returned.

        An early answer that does not (a 2xx before the body was read: a streaming upstream)
        is kept in :attr:`final` and the body goes on, as the upstream reads it. ``peek``: look
        for an answer first (one ``recv(MSG_PEEK)``, per chunk of a streamed body only)."""
        conn = self.conn
        if peek and self.final is None and conn.has_unexpected_bytes():
            early = await self._early()
            if early is not None:
                return early
        left: bytes | memoryview = conn.seal(data)
        while left:
            try:
                left = await conn.send_sealed(left, watch=self.final is None)
            except UpstreamProtocolError as exc:
                return await self._answer_after_failed_send(exc)
            if left:  # the socket is full and the upstream said something
                early = await self._early()
                if early is not None:
                    return early
        return None

    async def _answer_after_failed_send(self, exc: UpstreamProtocolError) -> UpstreamResponse:
        """The upstream reset or closed while the request went out: an answer it sent first wins."""
        if self.final is not None:
            return self.final
        try:
            return await self.read()
        except (UpstreamProtocolError, _StaleConnection):
            if self.received:
                raise exc from None
            raise _StaleConnection(str(exc)) from None

    async def _early(self) -> UpstreamResponse | None:
        """What the upstream said while the request was going out: an answer that stops the body."""
        self._receive_nowait()
        response = await self._parse()
        if response is None:
            return None
        closing = self.version != b"1.1" or any(
            n == b"connection" and b"close" in v.lower() for n, v in response.headers
        )
        if response.status >= 400 or closing:  # RFC 9112 §9.3: stop sending the body
            return response
        self.final = response
        return None

    async def read(self) -> UpstreamResponse:
        """The final response head, waiting for it (1xx heads before it passed on)."""
        while True:
            if self.buf:  # nothing can be there before the first wait: an answer was just asked for
                response = await self._parse()
                if response is not None:
                    return response
            await trio.lowlevel.wait_readable(self.conn.sock)
            self._receive_nowait()

    def _receive_nowait(self) -> None:
        conn = self.conn
        try:
            data = conn.recv_nowait()
        except UpstreamProtocolError as exc:
            if not self.received:
                raise _StaleConnection(str(exc)) from None
            raise
        if data is None:  # TLS housekeeping (a session ticket), no response bytes yet
            return
        if not data:
            if not self.received:
                raise _StaleConnection(f"{conn.host} closed the connection before answering")
            raise UpstreamProtocolError(f"{conn.host} closed the connection in the middle of the response head")
        self.received = True
        self.buf += data

    async def _parse(self) -> UpstreamResponse | None:
        """The final head if one is complete in the buffer; 1xx heads before it are passed on."""
        conn = self.conn
        h = conn.h11
        while True:
            match = _HEAD_END.search(self.buf)
            end = match.end() if match is not None else len(self.buf)
            if end > MAX_HEAD:
                raise UpstreamProtocolError(f"{conn.host} sent a response head over {MAX_HEAD} bytes")
            if match is None:
                return None
            head, self.buf = self.buf[:end], self.buf[end:]
            try:
                h.receive_data(head)
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(f"{conn.host} sent a malformed response: {exc}") from None
            if type(event) is h11.InformationalResponse:
                if event.status_code == 101:
                    raise UpstreamProtocolError(f"{conn.host} switched protocols, which a proxied request cannot")
                # 100 Continue answers an Expect Parkway never forwards (it answers its clients
                # itself); 102, 103 Early Hints and others are the client's (RFC 9110 §15.2).
                if event.status_code != 100 and self.informational is not None:
                    await self.informational(event.status_code, list(event.headers))
                continue
            if type(event) is not h11.Response:
                raise UpstreamProtocolError(f"{conn.host} sent a malformed response")
            headers = list(event.headers)
            self.version = event.http_version
            framing = body_framing(self.method, event.status_code, headers)
            return UpstreamResponse(event.status_code, headers, framing, conn, self.buf, self.idle_timeout)


def _parse(url: str, policy: AddressPolicy) -> tuple[Origin, bytes, bytes]:
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
