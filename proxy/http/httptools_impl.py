"""The accelerated client connection: llhttp (httptools) reads request heads, this module frames
request bodies and writes responses itself; no h11 on the common path.

Every decision is h11's (:mod:`proxy.http.framing` writes them out), so the answers are the
reference's byte for byte (tests/unit/http/test_impl_equivalence.py feeds both the same byte
streams). Where llhttp and h11 disagree, h11 decides:

* a head llhttp refuses (a bare LF, an obsolete folded line, a method it does not know, an
  HTTP version other than 1.0/1.1), or whose request line is not h11's (llhttp reads ``GET /``
  as HTTP/0.9), is re-read by h11, which refuses it with its own reason or reads it; a head
  that starts with a control byte or a blank line is h11's to refuse at once, as it does
  before the head is complete; a complete head over ``max_header_bytes`` is refused after
  h11's checks, as the h11 path measures it;
* a chunked request body is de-framed by h11 (primed with the head's framing): llhttp's chunk
  grammar differs from h11's (extensions, trailer line ends, sizes over 64 bits) and httptools
  cannot stop at the end of a message to leave a pipelined request alone. Chunked request
  bodies are rare; a Content-Length body is counted here.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncGenerator

import h11
import trio

from ..config import ServerConfig
from ..errors import BadRequest, HeadersTooLarge, RequestTimeout
from ..sweep import Cancellable, Sweep
from . import framing, parsers
from .connection import REASONS, TEXT, ClientGone, HTTPConnection, RequestHead, check_head
from .h11_impl import h11_refusal, header_pairs

# Their side (the request) and ours (the response), as h11 names the states that matter here.
IDLE, BODY, DONE, MIGHT_SWITCH, ERROR = range(5)  # theirs
SEND_RESPONSE, SEND_BODY, SWITCHED = 5, 6, 7  # ours, with IDLE, DONE and ERROR

_CONTINUE = framing.informational_head(100, b"", [])


class HttptoolsConnection(HTTPConnection):
    """One client connection read by llhttp, answering as :class:`~proxy.http.h11_impl.H11Connection`."""

    parser = "httptools"

    def __init__(self, stream: trio.abc.Stream | socket.socket, config: ServerConfig, peer: str):
        super().__init__(stream, config, peer)
        self._buffer = bytearray()  # received, not yet consumed: the body, a pipelined request
        self._eof = False  # the client closed its side (seen while reading a head)
        self._theirs = IDLE
        self._ours = IDLE
        self._method: bytes | None = None
        self._version: bytes | None = None
        self._keep_alive = True
        self._expect_continue = False
        self._switch = False  # Upgrade or CONNECT proposed: the request is not complete until answered
        self._left = 0  # Content-Length body bytes not yet read
        self._chunked: h11.Connection | None = None  # de-frames a chunked body
        self._body_kind = framing.LENGTH
        self._body_left = 0  # response body bytes still owed (LENGTH)

    # --- receiving ------------------------------------------------------------------------

    async def next_request(
        self, idle_timeout: float, scope: Cancellable | None = None, sweep: Sweep | None = None
    ) -> RequestHead | None:
        if scope is None or sweep is None:
            return await self._next_request_alone(idle_timeout)
        buffer = self._buffer
        limit = self.config.max_header_bytes
        started = await self._begin_head(len(buffer), idle_timeout, scope, sweep)
        try:
            while True:
                if not buffer:  # nothing yet (as a kept-alive connection starts): nothing to look for
                    pass
                elif buffer[0] < 0x21:  # h11 refuses this before the head is complete
                    head = self._h11_head(bytes(buffer), self._eof)
                    if head is not None:
                        return head
                else:
                    end = parsers.head_end(buffer)
                    if end >= 0:
                        head_bytes = bytes(buffer[:end])
                        del buffer[:end]
                        return self._take_head(head_bytes)
                    if len(buffer) > limit:
                        raise HeadersTooLarge(f"request head exceeds {limit} bytes")
                if self._eof:
                    if not started:
                        return None
                    raise BadRequest("connection closed in the middle of the request head", code="malformed_http")
                data = await self._receive()  # a read that waits enters the head's deadline first
                if not data:
                    self._eof = True
                    continue
                buffer += data
                if not started:  # the first byte: the whole head within header_read_timeout
                    started = True
                    self._head_began()
        finally:  # no pending deadline, no interruption left (see HTTPConnection.cancel)
            self._arm_in = 0.0
            self._interrupted = False

    def _h11_head(self, data: bytes, closed: bool, head_size: int = 0) -> RequestHead | None:
        """h11 reads what llhttp would not (see the module docstring): its refusal, its head
        (the rest of the request framed as usual), or None while it needs more bytes."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes)
        conn.receive_data(data)
        if closed:
            conn.receive_data(b"")
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            self._theirs = ERROR
            raise h11_refusal(exc, self.config.max_header_bytes) from exc
        if event is h11.NEED_DATA:
            return None
        if not isinstance(event, h11.Request):  # the client closed before a request: nothing to read
            return None
        self._buffer = bytearray(conn.trailing_data[0])
        size = head_size or len(data) - len(self._buffer)
        return self._start(
            event.method, event.target, event.http_version, header_pairs(event.headers), size, checked=True
        )

    def _take_head(self, head: bytes) -> RequestHead:
        try:
            parsed = parsers.parse_request_head(head)
        except parsers.HeadError:
            rest = bytes(self._buffer)
            result = self._h11_head(head + rest, closed=False, head_size=len(head))
            assert result is not None  # the head is complete: h11 reads it or refuses it
            return result
        return self._start(parsed.method, parsed.target, parsed.http_version, parsed.headers, len(head), checked=False)

    def _start(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        head_size: int,
        *,
        checked: bool,
    ) -> RequestHead:
        """The request's framing, keep-alive and 100-continue, as h11 decides them. A complete
        head over the limit is refused after h11's checks, as the h11 path measures it."""
        try:
            request, headers = framing.request_framing(method, target, version, headers)
        except framing.FramingError as exc:
            assert not checked, exc  # h11 already accepted this head
            self._theirs = ERROR
            raise BadRequest(f"malformed HTTP request: {exc}", code="malformed_http") from None
        self.head_only = method == b"HEAD"  # known before any refusal below is answered
        self._theirs = BODY
        self._ours = SEND_RESPONSE
        self._method = method
        self._version = version
        self._keep_alive = request.keep_alive
        self._expect_continue = request.expect_continue
        self._switch = request.switch_proposed
        self._left = request.length
        if request.chunked:
            self._chunked = h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes)
            self._chunked.receive_data(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
            assert isinstance(self._chunked.next_event(), h11.Request)
        if head_size > self.config.max_header_bytes:
            raise HeadersTooLarge(f"request head exceeds {self.config.max_header_bytes} bytes")
        fields = check_head(headers, controls=checked)  # llhttp refused control characters itself
        return tuple.__new__(  # a head is built for every request: the tuple itself, no __new__ of its own
            RequestHead,
            (
                TEXT[method] if method in TEXT else method.decode("ascii", "replace"),
                target.decode("latin-1"),
                tuple(headers),
                TEXT[version] if version in TEXT else version.decode("ascii"),
                self.peer,
                fields,
            ),
        )

    def _body_ended(self) -> None:
        self._theirs = MIGHT_SWITCH if self._switch else DONE
        self._chunked = None

    def _next_piece(self) -> bytes | None:
        """The next body bytes already received (b"" once the body is complete), or None."""
        chunked = self._chunked
        if chunked is None:
            if not self._left:
                self._body_ended()
                return b""
            if not self._buffer:
                return None
            take = min(self._left, len(self._buffer))
            piece = bytes(self._buffer[:take])
            del self._buffer[:take]
            self._left -= take
            self._expect_continue = False
            return piece
        if self._buffer:
            chunked.receive_data(bytes(self._buffer))
            self._buffer.clear()
        try:
            event = chunked.next_event()
        except h11.RemoteProtocolError as exc:
            self._theirs = ERROR
            raise h11_refusal(exc, self.config.max_header_bytes) from exc
        if type(event) is h11.Data:
            self._expect_continue = False
            return bytes(event.data)
        if type(event) is h11.EndOfMessage:
            self._buffer = bytearray(chunked.trailing_data[0])
            self._body_ended()
            return b""
        return None

    async def body_chunks(self) -> AsyncGenerator[bytes, None]:
        if self._expect_continue and self._ours == SEND_RESPONSE:
            # curl and others hold larger bodies back until told to go on (RFC 9110 10.1.1).
            self._expect_continue = False
            self._unsent.append(_CONTINUE)
            await self.flush()
        if self._theirs != BODY:
            return
        while True:
            piece = self._next_piece()
            if piece:
                yield piece
            elif piece is not None:
                self._body_read()
                return
            else:
                with trio.move_on_after(self.config.client_body_timeout) as scope:
                    data = await self._receive()
                if scope.cancelled_caught:
                    raise RequestTimeout(f"no request body data for {self.config.client_body_timeout:g} s")
                if not data:
                    raise ClientGone("client closed the connection before the body was complete")
                self._buffer += data

    @property
    def request_complete(self) -> bool:
        return self._theirs == DONE

    def _keep_pipelined(self, data: bytes) -> None:
        self._buffer += data

    def _settle_request(self) -> None:
        """Consume a request end that is already buffered (a refused GET has no body to wait for)."""
        while self._theirs == BODY:
            try:
                piece = self._next_piece()
            except (BadRequest, HeadersTooLarge):
                return
            if not piece:
                return

    # --- sending --------------------------------------------------------------------------

    @property
    def response_started(self) -> bool:
        return self._ours not in (IDLE, SEND_RESPONSE)

    @property
    def can_respond(self) -> bool:
        return self._ours in (IDLE, SEND_RESPONSE)

    async def send_informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self._ours != SEND_RESPONSE or self._version != b"1.1":
            return
        self._expect_continue = False
        try:
            head = framing.informational_head(status, REASONS.get(status, b""), headers)
        except framing.FramingError:
            self._ours = ERROR
            raise
        self._unsent.append(head)
        await self.flush()

    async def send_head(self, status: int, headers: list[tuple[bytes, bytes]], *, flush: bool = True) -> None:
        if self._theirs == BODY:
            self._settle_request()
        if self._close_after or not self.request_complete:
            # An unread request body cannot be skipped safely: close after this response.
            headers = [*headers, (b"connection", b"close")]
        if self._ours not in (IDLE, SEND_RESPONSE):
            self._ours = ERROR
            raise framing.FramingError("a response was already sent")
        try:
            start = framing.response_head(
                status,
                REASONS.get(status, b""),
                headers,
                request_method=self._method,
                client_version=self._version,
                keep_alive=self._keep_alive,
            )
        except framing.FramingError:
            self._ours = ERROR
            raise
        # A 2xx to CONNECT opens a tunnel (h11: SWITCHED_PROTOCOL): no HTTP body may follow.
        self._ours = SWITCHED if self._method == b"CONNECT" and 200 <= status < 300 else SEND_BODY
        self._expect_continue = False
        self._keep_alive = start.keep_alive
        self._body_kind = start.body
        self._body_left = start.length
        if self._theirs == MIGHT_SWITCH and self._ours != SWITCHED:  # any other answer turns the proposal down
            self._theirs = DONE
        self._unsent.append(start.head)
        if flush:
            await self.flush()

    def frame_data(self, data: bytes) -> bytes:
        if self._ours != SEND_BODY:
            self._ours = ERROR
            raise framing.FramingError("no response body may be sent now")
        if self._body_kind == framing.CHUNKED:
            return framing.frame_chunk(data)
        if self._body_kind == framing.LENGTH:
            if len(data) > self._body_left:
                self._ours = ERROR
                raise framing.FramingError("Too much data for declared Content-Length")
            self._body_left -= len(data)
        return data

    def frame_end(self) -> bytes:
        if self._ours != SEND_BODY:
            self._ours = ERROR
            raise framing.FramingError("no response may end now")
        if self._body_kind == framing.LENGTH and self._body_left:
            self._ours = ERROR
            raise framing.FramingError("Too little data for declared Content-Length")
        self._ours = DONE
        return framing.LAST_CHUNK if self._body_kind == framing.CHUNKED else b""

    @property
    def client_gets_chunked(self) -> bool:
        return self._ours == SEND_BODY and self._body_kind == framing.CHUNKED

    def send_failed(self) -> None:
        self._ours = ERROR

    def abort(self) -> None:
        if self._ours != DONE:
            self._ours = ERROR

    def hand_over(self) -> tuple[trio.abc.Stream, bytes]:
        self.handed_over = True
        self._ours = ERROR  # no HTTP response may follow, and the connection is not reused
        return self.stream, bytes(self._buffer)

    def reusable(self) -> bool:
        return self._ours == DONE and self._theirs == DONE and self._keep_alive

    def start_next_cycle(self) -> None:
        self._theirs = IDLE
        self._ours = IDLE
        self._method = None  # the client's HTTP version stays, as h11 keeps it
        self._keep_alive = True
        self._expect_continue = False
        self._switch = False
        self._left = 0
        self._chunked = None
        self._body_kind = framing.LENGTH
        self._body_left = 0
