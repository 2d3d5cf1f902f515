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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    url: str  # normalised, without fragment
    headers: Headers
    body: bytes | AsyncIterator[bytes] | None = None
    address_policy: AddressPolicy | None = None


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

    @asynccontextmanager
    async def open(self, req: UpstreamRequest) -> AsyncIterator[UpstreamResponse]:
        """Send ``req``; yield the response once its head has arrived. Leaving the context gives
        the connection back to the pool when the relay marked the response reusable, and closes
        it otherwise (an unfinished body: that stops the generation upstream)."""
        origin, target, host_header = _parse(req.url, req.address_policy or self.default_policy)
        name = f"{origin.host}:{origin.port}"
        response: UpstreamResponse | None = None
        try:
            with trio.fail_after(self.first_byte_timeout):
                response = await self._exchange(req, origin, target, host_header)
        except trio.TooSlowError:
            raise UpstreamTimeout(f"{name} sent no response within {self.first_byte_timeout:g} s") from None
        try:
            yield response
        finally:
            if origin.scheme == "https" and origin not in self._sessions:
                self._remember_session(origin, response.conn)
            if response.reusable:
                self.pool.give_back(origin, response.conn, trio.current_time())
            else:
                response.conn.close()

    def _remember_session(self, origin: Origin, conn: UpstreamConnection) -> None:
        """Keep one TLS session per origin to resume (reading it costs as much as relaying
        several events, so it is taken once and forgotten when a handshake did not resume it)."""
        session = conn.tls_session
        if session is not None:
            self._sessions[origin] = session

    async def _exchange(self, req: UpstreamRequest, origin: Origin, target: bytes, host: bytes) -> UpstreamResponse:
        conn = self.pool.take(origin, trio.current_time())
        replayable = not isinstance(req.body, AsyncIterator)
        if conn is not None:
            try:
                return await self._send_and_read_head(conn, req, target, host, reused=True)
            except _StaleConnection:
                conn.close()
                if not replayable:
                    raise UpstreamProtocolError(
                        f"{conn.host} closed a kept-alive connection before answering"
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
        if conn.tls and not conn.tls_resumed:
            self._sessions.pop(origin, None)  # expired or refused: the next answer's session replaces it
        try:
            return await self._send_and_read_head(conn, req, target, host, reused=False)
        except _StaleConnection as exc:
            conn.close()
            raise UpstreamProtocolError(str(exc)) from None

    async def _send_and_read_head(
        self, conn: UpstreamConnection, req: UpstreamRequest, target: bytes, host: bytes, *, reused: bool
    ) -> UpstreamResponse:
        try:
            await self._send_request(conn, req, target, host)
            response = await self._read_head(conn, req.method)
        except _StaleConnection:
            raise
        except BaseException:
            conn.close()
            raise
        return response

    async def _send_request(self, conn: UpstreamConnection, req: UpstreamRequest, target: bytes, host: bytes) -> None:
        headers = [(b"host", host), *req.headers]
        has_length = any(n == b"content-length" for n, _ in req.headers)
        body = req.body
        if isinstance(body, bytes):
            if not has_length:
                headers.append((b"content-length", str(len(body)).encode()))
        elif body is not None:
            if not has_length:
                headers.append((b"transfer-encoding", b"chunked"))
        elif req.method in _BODY_METHODS and not has_length:
            headers.append((b"content-length", b"0"))
        h = conn.h11
        try:
            data = h.send(h11.Request(method=req.method, target=target, headers=headers))
            if body is None or isinstance(body, bytes):
                if body:
                    data += h.send(h11.Data(data=body))
                data += h.send(h11.EndOfMessage())
                await _send_first(conn, data)
                return
            # The head goes out with the body's first chunk (usually the whole of a small body).
            chunks = aiter(body)
            first = await anext(chunks, b"")
            if first:
                data += h.send(h11.Data(data=first))
            await _send_first(conn, data)
            async for chunk in chunks:
                if chunk:
                    await conn.send_all(h.send(h11.Data(data=chunk)))
            end = h.send(h11.EndOfMessage())
            if end:
                await conn.send_all(end)
        except h11.LocalProtocolError as exc:
            raise UpstreamError(f"request to {conn.host} could not be sent: {exc}") from None

    async def _read_head(self, conn: UpstreamConnection, method: str) -> UpstreamResponse:
        h = conn.h11
        buf = b""
        received = False
        while True:
            match = _HEAD_END.search(buf)
            if match is None:
                if len(buf) > MAX_HEAD:
                    raise UpstreamProtocolError(f"{conn.host} sent a response head over {MAX_HEAD} bytes")
                try:
                    data = await conn.recv(wait_first=not received)  # nothing can be there before we wait
                except UpstreamProtocolError as exc:
                    if not received:
                        raise _StaleConnection(str(exc)) from None
                    raise
                if not data:
                    if not received:
                        raise _StaleConnection(f"{conn.host} closed the connection before answering")
                    raise UpstreamProtocolError(f"{conn.host} closed the connection in the middle of the response head")
                received = True
                buf += data
                continue
            end = match.end()
            head, buf = buf[:end], buf[end:]
            try:
                h.receive_data(head)
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(f"{conn.host} sent a malformed response: {exc}") from None
            if type(event) is h11.InformationalResponse:
                if event.status_code == 101:
                    raise UpstreamProtocolError(f"{conn.host} switched protocols, which a proxied request cannot")
                continue  # 100 Continue, 103 Early Hints: the final answer follows
            if type(event) is not h11.Response:
                raise UpstreamProtocolError(f"{conn.host} sent a malformed response")
            headers = list(event.headers)
            framing = body_framing(method, event.status_code, headers)
            return UpstreamResponse(event.status_code, headers, framing, conn, buf, self.idle_timeout)

    async def aclose(self) -> None:
        self.pool.close()


class _StaleConnection(Exception):
    """A connection failed before any byte of the response: a kept-alive one may be retried."""


async def _send_first(conn: UpstreamConnection, data: bytes) -> None:
    try:
        await conn.send_all(data)
    except UpstreamProtocolError as exc:
        raise _StaleConnection(str(exc)) from None


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


__all__ = ["ConnectionPool", "Origin", "UpstreamClient", "UpstreamRequest", "UpstreamResponse"]
