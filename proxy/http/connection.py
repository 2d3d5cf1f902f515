"""The only module that speaks HTTP/1.1 to client sockets: h11 on Trio, one task per connection.

It knows framing, keep-alive and timeouts, nothing about signatures: each parsed request
head is handed to an application object, which reads the body and writes the response
through :class:`HTTPConnection`. Structure follows h11's ``examples/trio-http/server.py``:
``send_failed()`` when a send raises, an error response only while h11 still allows one.
Listening, the accept loops and the drain are :mod:`proxy.http.server`.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncGenerator, Iterable, Iterator
from contextlib import aclosing, contextmanager, suppress
from dataclasses import dataclass
from http import HTTPStatus

import h11
import structlog
import trio

from ..config import ServerConfig
from ..errors import (
    BadRequest,
    BodyTooLarge,
    HeadersTooLarge,
    RequestTimeout,
    client_text,
)
from . import parsers

log = structlog.get_logger("parkway.server")

RECEIVE_SIZE = 65536
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class ClientGone(Exception):
    """The client closed the connection or stopped reading; nothing more can be sent."""


_SOCKET_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@contextmanager
def client_gone_on_socket_error(conn: h11.Connection | None = None) -> Iterator[None]:
    """Translate a failed socket operation into :class:`ClientGone` (as httpcore's
    ``map_exceptions`` does); with ``conn``, h11 is told the send failed."""
    try:
        yield
    except _SOCKET_ERRORS as exc:
        if conn is not None:
            conn.send_failed()
        raise ClientGone(str(exc) or type(exc).__name__) from exc


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str  # raw request-target as sent
    headers: tuple[tuple[bytes, bytes], ...]  # names lower-cased by h11
    http_version: str
    peer: str  # client IP address

    # Derived, not stored: a signed target is long, and a parked stream keeps its head.
    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: bytes) -> str | None:
        """The value of a header (repeated headers joined with ``, ``), or None."""
        values = [v for n, v in self.headers if n == name]
        if not values:
            return None
        return ", ".join(v.decode("latin-1") for v in values)


class HTTPConnection:
    """One client connection: h11 state plus the socket, with a timeout around every wait."""

    def __init__(self, stream: trio.SocketStream, config: ServerConfig, peer: str):
        self.stream = stream
        self.config = config
        self.peer = peer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_header_bytes)
        self.parser = parsers.resolve(config.http)  # h11 | httptools: what reads request heads
        self.bytes_in = 0
        self.bytes_out = 0
        self.head_bytes_in = 0  # bytes_in when the current request began
        self.request_done = trio.Event()  # set once the current request's body is fully read
        self._close_after = False
        self.head_only = False  # the current request is HEAD: its response has no body (RFC 9110 §9.3.2)
        self.handed_over = False  # the connection now speaks another protocol (see hand_over)
        self._unsent: list[bytes] = []  # encoded by a send with flush=False, written at the next flush
        # Written to directly when it is a real socket (see flush); None for in-memory streams.
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None

    # --- receiving ------------------------------------------------------------------------

    async def _receive(self) -> bytes:
        with client_gone_on_socket_error():
            data = await self.stream.receive_some(RECEIVE_SIZE)
        self.bytes_in += len(data)
        return data

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                raise HeadersTooLarge(f"request head exceeds {self.config.max_header_bytes} bytes") from exc
            # h11 quotes the offending line: shown capped and escaped, never whole (up to 16 KB).
            raise BadRequest(
                f"malformed HTTP request: {client_text(str(exc), 160, quoted=False)}", code="malformed_http"
            ) from exc

    async def next_request(self, idle_timeout: float) -> RequestHead | None:
        """Wait for the next request head; None when the client leaves or idles out between requests.

        The idle wait ends at the first byte; from there the whole head must arrive within
        ``header_read_timeout`` (slowloris protection).
        """
        if self.parser == "httptools":
            return await self._next_request_httptools(idle_timeout)
        self.head_bytes_in = self.bytes_in - len(self.conn.trailing_data[0])
        self.request_done = trio.Event()
        self.head_only = False
        deadline = trio.current_time() + idle_timeout
        started = bool(self.conn.trailing_data[0])
        if started:
            deadline = trio.current_time() + self.config.header_read_timeout
        while True:
            event = self._next_event()
            if isinstance(event, h11.Request):
                self.head_only = event.method == b"HEAD"  # known before any refusal below is answered
                # h11 only bounds heads it is still waiting for; a complete one read in a
                # single receive is measured here.
                head_size = self.bytes_in - len(self.conn.trailing_data[0]) - self.head_bytes_in
                if head_size > self.config.max_header_bytes:
                    raise HeadersTooLarge(f"request head exceeds {self.config.max_header_bytes} bytes")
                return self._head_from_h11(event)
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            assert event is h11.NEED_DATA, event
            data = b""
            with trio.move_on_at(deadline):
                data = await self._receive()
                if not data:
                    self.conn.receive_data(b"")
                    if not started:
                        return None
                    raise BadRequest("connection closed in the middle of the request head", code="malformed_http")
                self.conn.receive_data(data)
                if not started:
                    started = True
                    deadline = trio.current_time() + self.config.header_read_timeout
                continue
            if started:
                raise RequestTimeout(f"request head not received within {self.config.header_read_timeout:g} s")
            return None

    async def _next_request_httptools(self, idle_timeout: float) -> RequestHead | None:
        """:meth:`next_request` with the head parsed by httptools (see :mod:`proxy.http.parsers`):
        the same timeouts, limits and refusals; each request gets a fresh h11 connection, given
        the framing lines of the head and every byte after it."""
        pending, closed = self.conn.trailing_data  # a pipelined request's bytes, read with the last body
        buffer = bytearray(pending)
        self.head_bytes_in = self.bytes_in - len(buffer)
        self.request_done = trio.Event()
        self.head_only = False
        limit = self.config.max_header_bytes
        started = bool(buffer)
        deadline = trio.current_time() + (self.config.header_read_timeout if started else idle_timeout)
        while True:
            end = parsers.head_end(buffer)
            if end >= 0:
                if end > limit:
                    raise HeadersTooLarge(f"request head exceeds {limit} bytes")
                return self._take_head(bytes(buffer[:end]), bytes(buffer[end:]))
            if len(buffer) > limit:
                raise HeadersTooLarge(f"request head exceeds {limit} bytes")
            if closed:
                if not started:
                    return None
                raise BadRequest("connection closed in the middle of the request head", code="malformed_http")
            with trio.move_on_at(deadline):
                data = await self._receive()
                if not data:
                    closed = True
                    continue
                buffer += data
                if not started:
                    started = True
                    deadline = trio.current_time() + self.config.header_read_timeout
                continue
            if started:
                raise RequestTimeout(f"request head not received within {self.config.header_read_timeout:g} s")
            return None

    def _take_head(self, head: bytes, rest: bytes) -> RequestHead:
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes)
        try:
            parsed = parsers.parse_request_head(head)
        except parsers.HeadError:
            # Rare, and h11 (the reference) decides: it refuses the head with its own reason,
            # or reads what llhttp is stricter about (a bare LF, an obsolete folded line).
            self.conn.receive_data(head + rest)
            event = self._next_event()
            assert isinstance(event, h11.Request), event
            return self._head_from_h11(event)
        self.head_only = parsed.method == b"HEAD"
        self.conn.receive_data(parsed.framing + rest)
        event = self._next_event()  # h11 checks the framing lines as it would the whole head
        assert isinstance(event, h11.Request), event
        _check_head(parsed.headers)
        return RequestHead(
            method=parsed.method.decode("ascii", "replace"),
            target=parsed.target.decode("latin-1"),
            headers=tuple(parsed.headers),
            http_version=parsed.http_version.decode("ascii"),
            peer=self.peer,
        )

    def _head_from_h11(self, event: h11.Request) -> RequestHead:
        self.head_only = event.method == b"HEAD"  # known before any refusal below is answered
        _check_head(event.headers)
        return RequestHead(
            method=event.method.decode("ascii", "replace"),
            target=event.target.decode("latin-1"),
            headers=tuple(event.headers),
            http_version=event.http_version.decode("ascii"),
            peer=self.peer,
        )

    async def body_chunks(self) -> AsyncGenerator[bytes, None]:
        """Yield the request body as it arrives; a gap over ``client_body_timeout`` is a 408."""
        if self.conn.they_are_waiting_for_100_continue:
            # curl and others hold larger bodies back until told to go on (RFC 9110 10.1.1).
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        while True:
            event = self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.request_done.set()
                return
            elif event is h11.NEED_DATA:
                with trio.move_on_after(self.config.client_body_timeout) as scope:
                    data = await self._receive()
                if scope.cancelled_caught:
                    raise RequestTimeout(f"no request body data for {self.config.client_body_timeout:g} s")
                self.conn.receive_data(data)
                if not data and self.conn.their_state is h11.SEND_BODY:
                    raise ClientGone("client closed the connection before the body was complete")
            else:  # ConnectionClosed
                raise ClientGone("client closed the connection before the body was complete")

    async def read_body(self, limit: int) -> bytes:
        """Read the whole body into memory, refusing with 413 once it passes ``limit`` bytes."""
        buf = bytearray()
        async with aclosing(self.body_chunks()) as chunks:
            async for chunk in chunks:
                buf += chunk
                if len(buf) > limit:
                    self._close_after = True
                    raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes for signed bodies")
        return bytes(buf)

    @property
    def request_complete(self) -> bool:
        return self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    async def wait_disconnect(self) -> None:
        """Return once the client has closed its side; call only after the request body is read.

        Bytes of a pipelined next request are kept for h11, up to the header limit; past
        that, watching stops and the send path detects a disconnect instead.
        """
        pending = bytearray()
        while len(pending) <= self.config.max_header_bytes:
            if self._socket is not None:
                # Wait on the socket itself: this task waits here for the whole of a stream, and
                # a pending receive_some holds several more frames (1.5 KB per parked stream).
                await trio.lowlevel.wait_readable(self._socket)
            try:
                data = await self._receive()
            except ClientGone:
                return
            if not data:
                return
            pending += data
            self.conn.receive_data(bytes(data))
        await trio.sleep_forever()

    # --- sending --------------------------------------------------------------------------

    async def _send(self, event: h11.Event, *, flush: bool = True) -> None:
        try:
            data = self.conn.send(event)
        except h11.LocalProtocolError:
            self.conn.send_failed()
            raise
        if data:
            self._unsent.append(data)
        if flush:
            await self.flush()

    @property
    def socket(self) -> trio.socket.SocketType | None:
        """The client's socket, for a relay that writes to it directly (None for in-memory streams)."""
        return self._socket

    def take_unsent(self) -> bytes:
        """What sends with ``flush=False`` held back, for a caller that writes it itself."""
        data = b"".join(self._unsent)
        self._unsent.clear()
        return data

    async def flush(self) -> None:
        """Write what sends with ``flush=False`` held back, together with anything since, in one write.

        The kernel takes a small write whole when the client reads: then it costs one system
        call, with no cancel scope and no Trio socket layers (nor a checkpoint). Only what it
        does not take waits, for at most ``client_write_timeout``.
        """
        if not self._unsent:
            return
        data = self._unsent[0] if len(self._unsent) == 1 else b"".join(self._unsent)
        self._unsent.clear()
        sent = 0
        if self._socket is not None:
            with client_gone_on_socket_error(self.conn), suppress(BlockingIOError):
                sent = os.write(self._socket.fileno(), data)  # the socket is non-blocking
            self.bytes_out += sent
        if sent == len(data):
            return
        rest = memoryview(data)[sent:] if sent else data
        with client_gone_on_socket_error(self.conn):
            with trio.CancelScope(deadline=trio.current_time() + self.config.client_write_timeout) as scope:
                await self.stream.send_all(rest)
        if scope.cancelled_caught:
            self.conn.send_failed()
            raise ClientGone(f"client did not read the response for {self.config.client_write_timeout:g} s")
        self.bytes_out += len(rest)

    @property
    def response_started(self) -> bool:
        return self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def can_respond(self) -> bool:
        # IDLE too: after a malformed head h11 still lets us answer 400 (h11's trio example).
        return self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    def _settle_request(self) -> None:
        """Consume a request end that is already buffered (a refused GET has no body to wait for)."""
        while self.conn.their_state is h11.SEND_BODY:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                return
            if not isinstance(event, h11.Data):
                return

    def close_after_response(self) -> None:
        """Ask for ``Connection: close`` on the response (e.g. an unread body, or draining)."""
        self._close_after = True

    async def send_informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """A 1xx head before the response (103 Early Hints, 102 Processing), to an HTTP/1.1
        client only: RFC 9110 §15.2, an HTTP/1.0 client cannot tell it from the answer."""
        if self.conn.our_state is not h11.SEND_RESPONSE or self.conn.their_http_version != b"1.1":
            return
        reason = _REASONS.get(status, b"")
        await self._send(h11.InformationalResponse(status_code=status, headers=headers, reason=reason))

    async def send_head(self, status: int, headers: list[tuple[bytes, bytes]], *, flush: bool = True) -> None:
        """Send the response head; with ``flush=False`` it is held and goes out with the next write."""
        self._settle_request()
        if self._close_after or not self.request_complete:
            # An unread request body cannot be skipped safely: close after this response.
            headers = [*headers, (b"connection", b"close")]
        reason = _REASONS.get(status, b"")
        await self._send(h11.Response(status_code=status, headers=headers, reason=reason), flush=flush)

    async def send_data(self, data: bytes, *, flush: bool = True) -> None:
        if data:
            await self._send(h11.Data(data=data), flush=flush)
        elif flush:
            await self.flush()

    async def send_end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def send_full(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole response in one write."""
        await self.send_head(status, headers, flush=False)
        await self.send_data(body, flush=False)
        await self.send_end()

    def abort(self) -> None:
        """Give up on the response: the client sees a truncated stream (no chunked terminator)."""
        if self.conn.our_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self.conn.send_failed()

    def hand_over(self) -> tuple[trio.abc.Stream, bytes]:
        """Give the connection to another protocol (a WebSocket after its upgrade was accepted):
        the stream, and the bytes h11 received after the request head. HTTP on it is over:
        nothing more is sent or read here, and the server closes it when the handler returns."""
        self.handed_over = True
        self.conn.send_failed()  # no HTTP response may follow, and the connection is not reused
        return self.stream, bytes(self.conn.trailing_data[0])

    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    def start_next_cycle(self) -> None:
        """Get ready for the next request on a kept-alive connection (after :meth:`reusable`)."""
        self.conn.start_next_cycle()


_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _check_head(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """What h11 lets through but a proxy must refuse (then close the connection after answering).

    * Content-Length and Transfer-Encoding together (RFC 9112 6.1): h11 frames the body by
      Transfer-Encoding, and the client's Content-Length could be passed on beside a body of
      another length.
    * A control character in a header value: h11 unfolds an obsolete folded line (RFC 9112 5.2)
      without checking it, and the value would reach the upstream, or a log viewer.
    """
    names = {name for name, _ in headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        raise BadRequest(
            "malformed HTTP request: both Content-Length and Transfer-Encoding are present; send one",
            code="malformed_http",
        )
    for name, value in headers:
        if _CONTROL.search(value):
            raise BadRequest(
                f"malformed HTTP request: header {client_text(name, 64, quoted=False)} has a control character "
                "(or an obsolete folded line)",
                code="malformed_http",
            )
