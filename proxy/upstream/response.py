"""The response heads of one proxied exchange, and the answer they make.

:class:`HeadReader` reads every head the upstream sends while the request goes out and after
it (1xx heads are passed on or skipped) through the connection's HTTP/1.1
(:class:`~proxy.upstream.wire.UpstreamHTTP`); the final head becomes an
:class:`UpstreamResponse`, which the relay takes with its raw connection. The pool, retries and
the request's way out are :mod:`proxy.upstream.client`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import trio

from ..errors import UpstreamProtocolError
from ..http.chunked import Framing
from ..http.parsers import head_end
from .connection import UpstreamConnection
from .wire import BrokenResponse

Headers = list[tuple[bytes, bytes]]
# Where 1xx heads other than 100 go (103 Early Hints, 102): the client's, when it may have them.
Informational = Callable[[int, Headers], Awaitable[None]]

MAX_HEAD = 65536
# How long after a request went out HeadReader.read keeps yielding rather than waiting, when the
# answer has not come with its first turn (see there): measured on one sequential client, 50 µs took
# Parkway's added latency from 494 to 433 µs; 100 µs did no better.
SPIN = 50e-6
_monotonic = time.monotonic  # a duration only (one C call, where trio.current_time is three frames)


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
        self.content_type = ""
        for n, v in headers:  # a loop, not next() over a generator: no generator and its frames
            if n == b"content-type":
                self.content_type = v.decode("latin-1")
                break
        self.framing = framing
        self.conn = conn
        self.initial = initial
        self.idle_timeout = idle_timeout
        self.reusable = False


class StaleConnection(Exception):
    """A connection failed before any byte of the response: a kept-alive one may be retried."""


class HeadReader:
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
        sealed = conn.seal(data)
        try:  # a small request fits the socket: sent here, without the waiting loop's coroutine
            sent = conn.send_nowait(sealed)
        except UpstreamProtocolError as exc:
            return await self._answer_after_failed_send(exc)
        if sent == len(sealed):
            return None
        left: bytes | memoryview = memoryview(sealed)[sent:]
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
        except (UpstreamProtocolError, StaleConnection):
            if self.received:
                raise exc from None
            raise StaleConnection(str(exc)) from None

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
        """The final response head, waiting for it (1xx heads before it passed on).

        The request has just gone out, so first the task only yields (the other tasks run) and
        then reads: on a busy server the answer has come by then, and the wait's ``epoll_ctl``
        and trio's registration are saved. On an idle one it keeps yielding and reading for
        :data:`SPIN` after the send before it waits: a nearby upstream answers within that, and
        the loop then never sleeps, so the answer does not wait for the process to be woken
        (an idle core's wake-up costs tens of µs, more than the turns). A busy loop's first
        turn outlasts the window: no extra turn there."""
        await trio.lowlevel.cancel_shielded_checkpoint()
        self._receive_nowait()
        if not self.buf:
            until = _monotonic() + SPIN
            while not self.buf and _monotonic() < until:
                await trio.lowlevel.cancel_shielded_checkpoint()
                self._receive_nowait()
        while True:
            if self.buf:
                response = self._next_head()
                if isinstance(response, tuple):
                    response = await self._parse(response)
                if response is not None:
                    return response
            await trio.lowlevel.wait_readable(self.conn.fd)  # the number: trio asks a socket for it (one call)
            self._receive_nowait()

    def _receive_nowait(self) -> None:
        conn = self.conn
        try:
            data = conn.recv_nowait()
        except UpstreamProtocolError as exc:
            if not self.received:
                raise StaleConnection(str(exc)) from None
            raise
        if data is None:  # TLS housekeeping (a session ticket), no response bytes yet
            return
        if not data:
            if not self.received:
                raise StaleConnection(f"{conn.host} closed the connection before answering")
            raise UpstreamProtocolError(f"{conn.host} closed the connection in the middle of the response head")
        self.received = True
        self.buf += data

    async def _parse(self, parsed: UpstreamResponse | tuple[int, Headers] | None = None) -> UpstreamResponse | None:
        """The final head if one is complete in the buffer; 1xx heads before it are passed on
        (``parsed``: the one already taken from it)."""
        if parsed is None:
            parsed = self._next_head()
        while isinstance(parsed, tuple):
            assert self.informational is not None
            await self.informational(*parsed)
            parsed = self._next_head()
        return parsed

    def _next_head(self) -> UpstreamResponse | tuple[int, Headers] | None:
        """The final head if one is complete in the buffer (None if not yet), or a 1xx head
        before it for :attr:`informational`, as (status, headers); other 1xx heads are skipped.
        Not a coroutine: the common answer is read without one."""
        conn = self.conn
        while True:
            found = head_end(self.buf)
            end = found if found >= 0 else len(self.buf)
            if end > MAX_HEAD:
                raise UpstreamProtocolError(f"{conn.host} sent a response head over {MAX_HEAD} bytes")
            if found < 0:
                return None
            head, self.buf = self.buf[:end], self.buf[end:]
            try:
                parsed = conn.http.read_head(head)
            except BrokenResponse as exc:
                raise UpstreamProtocolError(f"{conn.host} sent a malformed response: {exc}") from None
            if parsed.framing is None:  # 1xx
                if parsed.status == 101:
                    raise UpstreamProtocolError(f"{conn.host} switched protocols, which a proxied request cannot")
                # 100 Continue answers an Expect Parkway never forwards (it answers its clients
                # itself); 102, 103 Early Hints and others are the client's (RFC 9110 §15.2).
                if parsed.status != 100 and self.informational is not None:
                    return parsed.status, parsed.headers
                continue
            self.version = parsed.version
            return UpstreamResponse(parsed.status, parsed.headers, parsed.framing, conn, self.buf, self.idle_timeout)
