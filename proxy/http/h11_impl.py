"""The reference client connection: h11 reads every request and writes every response.

Structure follows h11's ``examples/trio-http/server.py``: ``send_failed()`` when a send
raises, an error response only while h11 still allows one. It is the default of a bare
install (``[server] http = "h11"``), and the oracle :mod:`proxy.http.httptools_impl` is
tested against.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncGenerator, Sequence

import h11
import trio

from ..config import ServerConfig
from ..errors import BadRequest, HeadersTooLarge, RequestTimeout, client_text
from ..sweep import Cancellable, Sweep
from .connection import REASONS, TEXT, ClientGone, HTTPConnection, RequestHead, check_head


def h11_refusal(exc: h11.RemoteProtocolError, max_header_bytes: int) -> BadRequest | HeadersTooLarge:
    """h11's refusal of what the client sent, as Parkway's error (431 or 400 ``malformed_http``)."""
    if exc.error_status_hint == 431:
        return HeadersTooLarge(f"request head exceeds {max_header_bytes} bytes")
    # h11 quotes the offending line: shown capped and escaped, never whole (up to 16 KB).
    return BadRequest(f"malformed HTTP request: {client_text(str(exc), 160, quoted=False)}", code="malformed_http")


def header_pairs(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """h11's headers as (lower-case name, value) pairs, in order: read from the triples h11 keeps
    in one comprehension, where iterating its ``Headers`` costs two Python calls per header
    (``Sequence.__iter__``, ``Headers.__getitem__``) and an IndexError at the end. Its public
    iteration if h11 ever keeps them otherwise (tests/unit/http/test_connection.py checks both agree)."""
    items = getattr(headers, "_full_items", None)
    if items is None:
        return list(headers)
    return [(name, value) for _, name, value in items]


class H11Connection(HTTPConnection):
    """One client connection: h11 state plus the socket, with a timeout around every wait."""

    parser = "h11"

    def __init__(self, stream: trio.abc.Stream | socket.socket, config: ServerConfig, peer: str):
        super().__init__(stream, config, peer)
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_header_bytes)

    # --- receiving ------------------------------------------------------------------------

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise h11_refusal(exc, self.config.max_header_bytes) from exc

    async def next_request(
        self, idle_timeout: float, scope: Cancellable | None = None, sweep: Sweep | None = None
    ) -> RequestHead | None:
        if scope is None or sweep is None:
            return await self._next_request_alone(idle_timeout)
        started = await self._begin_head(len(self.conn.trailing_data[0]), idle_timeout, scope, sweep)
        # Nothing buffered, the client's side open: h11 (IDLE, at a cycle's start) can only say
        # NEED_DATA, so it is first asked once bytes have come (its empty look: 18 calls, 1.9 us).
        ask = started or self.conn.trailing_data[1]
        try:
            while True:
                event = self._next_event() if ask else h11.NEED_DATA
                ask = True
                if type(event) is h11.Request:  # not isinstance: a miss costs an ABC check (two calls)
                    self.head_only = event.method == b"HEAD"  # known before any refusal below is answered
                    # h11 only bounds heads it is still waiting for; a complete one read in a
                    # single receive is measured here.
                    head_size = self.bytes_in - len(self.conn.trailing_data[0]) - self.head_bytes_in
                    if head_size > self.config.max_header_bytes:
                        raise HeadersTooLarge(f"request head exceeds {self.config.max_header_bytes} bytes")
                    return self._head_from_h11(event)
                if type(event) is h11.ConnectionClosed or event is h11.PAUSED:
                    return None
                assert event is h11.NEED_DATA, event
                data = await self._receive()  # a read that waits enters the head's deadline first
                if not data:
                    self.conn.receive_data(b"")
                    if not started:
                        return None
                    raise BadRequest("connection closed in the middle of the request head", code="malformed_http")
                self.conn.receive_data(data)
                if not started:  # the first byte: the whole head within header_read_timeout
                    started = True
                    self._head_began()
        finally:  # no pending deadline, no interruption left (see HTTPConnection.cancel)
            self._arm_in = 0.0
            self._interrupted = False

    def _head_from_h11(self, event: h11.Request) -> RequestHead:
        self.head_only = event.method == b"HEAD"  # known before any refusal below is answered
        headers = header_pairs(event.headers)
        fields = check_head(headers)
        method, version = event.method, event.http_version
        return tuple.__new__(  # a head is built for every request: the tuple itself, no __new__ of its own
            RequestHead,
            (
                TEXT[method] if method in TEXT else method.decode("ascii", "replace"),
                event.target.decode("latin-1"),
                tuple(headers),
                TEXT[version] if version in TEXT else version.decode("ascii"),
                self.peer,
                fields,
            ),
        )

    async def body_chunks(self) -> AsyncGenerator[bytes, None]:
        """Yield the request body as it arrives; a gap over ``client_body_timeout`` is a 408."""
        if self.conn.they_are_waiting_for_100_continue:
            # curl and others hold larger bodies back until told to go on (RFC 9110 10.1.1).
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise h11_refusal(exc, self.config.max_header_bytes) from exc
            if type(event) is h11.Data:
                yield bytes(event.data)
            elif type(event) is h11.EndOfMessage:
                self._body_read()
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

    @property
    def request_complete(self) -> bool:
        return self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    def _keep_pipelined(self, data: bytes) -> None:
        self.conn.receive_data(data)

    # --- sending --------------------------------------------------------------------------

    def _encode(self, event: h11.Event) -> bytes:
        try:
            return self.conn.send(event) or b""
        except h11.LocalProtocolError:
            self.conn.send_failed()
            raise

    async def _send(self, event: h11.Event, *, flush: bool = True) -> None:
        data = self._encode(event)
        if data:
            self._unsent.append(data)
        if flush:
            await self.flush()

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
            if type(event) is not h11.Data:
                return

    async def send_informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """A 1xx head before the response (103 Early Hints, 102 Processing), to an HTTP/1.1
        client only: RFC 9110 §15.2, an HTTP/1.0 client cannot tell it from the answer."""
        if self.conn.our_state is not h11.SEND_RESPONSE or self.conn.their_http_version != b"1.1":
            return
        reason = REASONS.get(status, b"")
        await self._send(h11.InformationalResponse(status_code=status, headers=headers, reason=reason))

    async def send_head(self, status: int, headers: list[tuple[bytes, bytes]], *, flush: bool = True) -> None:
        """Send the response head; with ``flush=False`` it is held and goes out with the next write.
        (``_settle_request``, ``request_complete`` and ``_send`` written out: a response per request.)"""
        conn = self.conn
        theirs = conn.their_state
        if theirs is h11.SEND_BODY:
            self._settle_request()
            theirs = conn.their_state
        if self._close_after or theirs not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            # An unread request body cannot be skipped safely: close after this response.
            headers = [*headers, (b"connection", b"close")]
        try:
            data = conn.send(h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b"")))
        except h11.LocalProtocolError:
            conn.send_failed()
            raise
        if data:
            self._unsent.append(data)
        if flush:
            await self.flush()

    def frame_data(self, data: bytes) -> bytes:
        try:
            return self.conn.send(h11.Data(data=data)) or b""
        except h11.LocalProtocolError:
            self.conn.send_failed()
            raise

    def frame_end(self) -> bytes:
        try:
            return self.conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            self.conn.send_failed()
            raise

    @property
    def client_gets_chunked(self) -> bool:
        # h11's body writer's choice; h11 has no public name for it. If that ever changes, this
        # says no and the body takes the re-framing path, as correct and only slower
        # (tests/unit/relay/test_stream.py checks the pass-through byte for byte).
        return type(getattr(self.conn, "_writer", None)).__name__ == "ChunkedWriter"

    def send_failed(self) -> None:
        self.conn.send_failed()

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
