"""A client connection's face: what the gateway, the relay, the cache and WebSockets call to
read a request and write its response, whichever parser reads it (uvicorn's split between
``h11_impl`` and ``httptools_impl``).

It knows framing, keep-alive and timeouts, nothing about signatures: each parsed request
head is handed to an application object, which reads the body and writes the response
through :class:`HTTPConnection`. The two implementations are :mod:`proxy.http.h11_impl`
(h11, the reference and the default of a bare install) and :mod:`proxy.http.httptools_impl`
(llhttp for heads, its own body framing and response writing, decided as h11 decides:
:mod:`proxy.http.framing`); :func:`proxy.http.server.open_connection` picks one. Listening,
the accept loops and the drain are :mod:`proxy.http.server`.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from http import HTTPStatus
from typing import NamedTuple

import structlog
import trio
from trio.lowlevel import cancel_shielded_checkpoint, checkpoint_if_cancelled, wait_readable, wait_writable

from ..config import ServerConfig
from ..errors import BadRequest, BodyTooLarge, RequestTimeout, client_text
from ..sweep import Cancellable, Sweep

log = structlog.get_logger("parkway.server")

RECEIVE_SIZE = 65536
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
# The methods and versions nearly every request has, as text without decoding them each time.
TEXT = {t.encode(): t for t in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "1.1", "1.0")}


# The client's socket: the accepted one itself, or a trio stream's (tests' listeners).
ClientSocket = socket.socket | trio.socket.SocketType


class ClientGone(Exception):
    """The client closed the connection or stopped reading; nothing more can be sent."""


class HeadInterrupted(Exception):
    """:meth:`HTTPConnection.cancel` stopped the head wait of :meth:`HTTPConnection.next_request`
    (the head's deadline passed, or the server is shutting down): what a cancelled scope around it
    would have said, for a connection the server waits on without one."""


# A failed socket operation means the client is gone (as httpcore's ``map_exceptions`` maps them):
# caught around each read and write below with a plain try, which costs nothing when nothing fails
# (a context manager cost 1.2 us per read).
_SOCKET_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _gone(exc: BaseException) -> ClientGone:
    return ClientGone(str(exc) or type(exc).__name__)


class _Head(NamedTuple):
    method: str
    target: str  # raw request-target as sent
    headers: tuple[tuple[bytes, bytes], ...]  # names lower-cased by h11
    http_version: str
    peer: str  # client IP address
    # Lower-case name → value, repeated headers joined with ``, `` (built once where the head is
    # read, by :func:`check_head`, so that asking for a header is a lookup, not a scan).
    fields: dict[bytes, bytes]


class RequestHead(_Head):
    """A request head, immutable. A tuple: the faces build one per request with
    ``tuple.__new__(RequestHead, (...))`` (0.2 µs, a frozen dataclass cost 1.1); built by hand
    (tests, benches), ``fields`` is derived from ``headers``."""

    __slots__ = ()

    def __new__(
        cls,
        method: str,
        target: str,
        headers: tuple[tuple[bytes, bytes], ...],
        http_version: str,
        peer: str,
        fields: dict[bytes, bytes] | None = None,
    ) -> RequestHead:
        if not fields:
            fields = header_fields(headers) if headers else {}
        return tuple.__new__(cls, (method, target, headers, http_version, peer, fields))

    # Derived, not stored: a signed target is long, and a parked stream keeps its head.
    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: bytes) -> str | None:
        """The value of a header (repeated headers joined with ``, ``), or None."""
        fields = self.fields
        return fields[name].decode("latin-1") if name in fields else None


class HTTPConnection:
    """One client connection, whichever parser reads it: the interface the gateway, the relay,
    the cache and WebSockets use, and what both implementations share (the socket, the
    unflushed writes, the byte counts). :mod:`proxy.http.h11_impl` is the reference,
    :mod:`proxy.http.httptools_impl` the accelerated twin; both answer byte for byte alike."""

    parser = "h11"  # which implementation this is (the start-up log line and /metrics name it)
    # The current request's "body fully read" event, made only when someone waits for it (see
    # request_done): None, or _DONE once the body was read before anyone asked.
    _request_done: trio.Event | None = None

    def __init__(self, stream: trio.abc.Stream | socket.socket, config: ServerConfig, peer: str):
        # A socket the server accepted itself is the connection (no trio socket or SocketStream
        # around it, see the stream property); a trio stream is read through its socket when it has one.
        if isinstance(stream, socket.socket):
            self._stream: trio.abc.Stream | None = None
            self._socket: ClientSocket | None = stream
        else:
            self._stream = stream
            # Written to directly when it is a real socket (see flush); None for in-memory streams.
            self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        # The socket's descriptor, read and written directly (-1: an in-memory stream).
        self.fd = self._socket.fileno() if self._socket is not None else -1
        self.config = config
        self.peer = peer
        self.bytes_in = 0
        self.bytes_out = 0
        self.head_bytes_in = 0  # bytes_in when the current request began
        self.head_started = False  # bytes of the head next_request waits for have arrived
        self._close_after = False
        self.head_only = False  # the current request is HEAD: its response has no body (RFC 9110 §9.3.2)
        self.handed_over = False  # the connection now speaks another protocol (see hand_over)
        # The head's pending deadline while next_request reads one (seconds from when it is entered;
        # negative: enter it at the next read, waiting or not), and where it goes (see _enter_deadline).
        self._arm_in = 0.0
        self._head_scope: Cancellable | None = None
        self._sweep: Sweep | None = None
        self._interrupted = False  # cancel() was called during this head wait (see HeadInterrupted)
        self._unsent: list[bytes] = []  # encoded by a send with flush=False, written at the next flush

    @property
    def stream(self) -> trio.abc.Stream:
        """The connection as a trio stream: made on first use for a socket the server accepted
        itself (a WebSocket's hand-over, a lingering close), which the common path never needs."""
        if self._stream is None:
            assert isinstance(self._socket, socket.socket)
            self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(self._socket))
        return self._stream

    @property
    def request_done(self) -> trio.Event:
        """Set once the current request's body is fully read. Made when first asked for (the
        portable relay's client watch waits for it), not per request: the relay engine never does."""
        event = self._request_done
        if event is None:
            event = self._request_done = trio.Event()
        return event

    def _body_read(self) -> None:
        """The current request's body is fully read: :attr:`request_done` is (or will be made) set."""
        event = self._request_done
        if event is None:
            self._request_done = _DONE
        else:
            event.set()

    def close_socket(self) -> bool:
        """Close the client's socket, if the connection is one (False for an in-memory stream).

        A socket the server accepted itself is closed as it is: no task waits on it once its
        connection's task ends (what waits on it, a client watch or a WebSocket, runs inside
        the request's handler), so trio's ``notify_closing`` has nobody to wake, and its
        ``EPOLL_CTL_DEL`` (a failing system call for a socket trio never waited on) is not
        needed: the close takes the socket out of every epoll set. Once a trio stream was made
        of it (a WebSocket, a lingering close), that stream's socket is closed through trio."""
        sock = self._socket
        if sock is None:
            return False
        stream = self._stream
        if isinstance(stream, trio.SocketStream):
            stream.socket.close()  # trio's close: notify_closing, then the close
        else:
            sock.close()
        return True

    async def _receive(self) -> bytes:
        """The next bytes from the client (b"" at its end), read from the socket itself.

        As trio's ``receive_some`` does, without its layers (stream error translation, the
        socket wrapper, the non-blocking helper and its async context manager): a cancellation
        is noticed before reading, and a read that finds bytes ready still yields once
        (``cancel_shielded_checkpoint``, as trio does), so that a client that always has bytes
        ready (a flooding one, its requests refused without waiting for anything) cannot keep
        every other connection waiting. A read that had to wait yields in the wait.

        While :meth:`next_request` reads a head, its pending deadline (``_arm_in``) is entered in
        the sweep's table only when the read has to wait: a busy server finds a kept-alive
        connection's next request there already, and then enters none."""
        fd = self.fd
        if self._arm_in and (self._arm_in < 0 or fd < 0):  # a head's deadline to enter at once
            self._enter_deadline()
        if fd < 0:  # an in-memory stream (tests, benches)
            try:
                data = bytes(await self.stream.receive_some(RECEIVE_SIZE))
            except _SOCKET_ERRORS as exc:
                raise _gone(exc) from exc
            self.bytes_in += len(data)
            return data
        await checkpoint_if_cancelled()
        if self._interrupted:
            raise HeadInterrupted
        try:
            data = os.read(fd, RECEIVE_SIZE)  # the socket is non-blocking
        except BlockingIOError:
            if self._arm_in:  # a head's deadline, entered only now that the read has to wait
                self._enter_deadline()
            return await self._receive_ready(fd)
        except OSError as exc:
            raise _gone(exc) from exc
        # Not at the client's end (nothing more is read): one task step fewer. The first read
        # of a connection still yields: without it a burst's set-ups ran a step earlier and a
        # parked stream's longest gap during tests/e2e/test_ramp.py's burst grew (median 13%
        # -> 16% of the burst, 28 runs).
        if data:
            await cancel_shielded_checkpoint()
        self.bytes_in += len(data)
        return data

    async def _receive_ready(self, fd: int) -> bytes:
        """Wait until the socket is readable (a checkpoint), then read it."""
        while True:
            try:
                await wait_readable(fd)
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:  # woken without bytes (another reader took them)
                continue
            except _SOCKET_ERRORS as exc:
                if self._interrupted:  # cancel() woke this wait (trio's notify_closing)
                    raise HeadInterrupted from None
                raise _gone(exc) from exc
            self.bytes_in += len(data)
            return data

    # --- what each implementation provides ---------------------------------------------------

    async def next_request(
        self, idle_timeout: float, scope: Cancellable | None = None, sweep: Sweep | None = None
    ) -> RequestHead | None:
        """Wait for the next request head; None when the client leaves or idles out between requests.

        The idle wait ends at the first byte; from there the whole head must arrive within
        ``header_read_timeout`` (slowloris protection). ``scope`` is what stops this wait: the
        caller's cancel scope around this call, or, on a socket the server accepted, the
        connection itself (:meth:`cancel`, no scope: this then raises :class:`HeadInterrupted`);
        ``sweep`` is the server's table of connections waiting for a head
        (:class:`~proxy.sweep.Sweep`): the timeouts are ``scope``'s deadline there, entered when
        a read has to wait (:meth:`_enter_deadline`); the sweep cancels it once it has passed;
        the caller takes it out of the table when this returns. When that cancels it,
        :meth:`head_timeout` says what to answer. Without a scope, a head that began and timed
        out raises ``RequestTimeout``."""
        raise NotImplementedError

    async def _begin_head(self, buffered: int, idle_timeout: float, scope: Cancellable, sweep: Sweep) -> bool:
        """A request cycle's start, for both implementations' :meth:`next_request`: where its head
        is counted from, whether it has begun (``buffered`` bytes of a pipelined request are
        here: a schedule point per request, which no read gives, and ``header_read_timeout`` at
        once), and the first read's timeout, pending (:meth:`_enter_deadline`)."""
        self.head_bytes_in = self.bytes_in - buffered
        self._request_done = None
        self.head_only = False
        self._head_scope, self._sweep = scope, sweep
        started = self.head_started = buffered > 0
        if started:
            self._arm_in = self.config.header_read_timeout
            await cancel_shielded_checkpoint()
        else:
            self._arm_in = idle_timeout
        return started

    def _head_began(self) -> None:
        """The head's first byte has come: from here the whole head within ``header_read_timeout``.
        Counted from the next read that has to wait when no deadline was entered yet (none is
        running: the bytes so far came without waiting), else entered at the next read."""
        self.head_started = True
        timeout = self.config.header_read_timeout
        self._arm_in = timeout if self._arm_in else -timeout

    def _enter_deadline(self) -> None:
        """Enter the pending head deadline, from now, in the sweep's table (it cancels the head's scope)."""
        sweep = self._sweep
        assert sweep is not None and self._head_scope is not None
        sweep.deadlines[self._head_scope] = sweep.now() + abs(self._arm_in)
        self._arm_in = 0.0

    async def _next_request_alone(self, idle_timeout: float) -> RequestHead | None:
        """:meth:`next_request` in a scope of its own, its deadline the scope's own (no sweep)."""
        with trio.CancelScope() as scope:
            return await self.next_request(idle_timeout, scope, Sweep.on_scopes())
        timed_out = self.head_timeout()
        if timed_out is not None:
            raise timed_out
        return None

    def cancel(self) -> None:
        """Stop the head wait of :meth:`next_request` on a socket the server accepted (the
        sweep and shutdown call this, as they cancel a scope): a read waiting in trio is woken
        at once (``notify_closing``, which leaves the socket open), and the wait raises
        :class:`HeadInterrupted` at its next read (next_request clears this when it ends). A
        connection waits for its heads this way instead of in a cancel scope of its own (a
        scope costs a connection ~30 calls)."""
        assert self.fd >= 0
        self._interrupted = True
        trio.lowlevel.notify_closing(self.fd)

    def head_timeout(self) -> RequestTimeout | None:
        """After :meth:`next_request`'s deadline cancelled its scope: a 408 for a head that had
        begun (then close), None for a connection that idled out (close silently)."""
        if self.head_started:
            return RequestTimeout(f"request head not received within {self.config.header_read_timeout:g} s")
        return None

    def body_chunks(self) -> AsyncGenerator[bytes, None]:
        """Yield the request body as it arrives; a gap over ``client_body_timeout`` is a 408."""
        raise NotImplementedError

    @property
    def request_complete(self) -> bool:
        raise NotImplementedError

    async def wait_disconnect(self) -> None:
        """Return once the client has closed its side; call only after the request body is read.

        Bytes of a pipelined next request are kept (:meth:`_keep_pipelined`), up to the header
        limit; past that, watching stops and the send path detects a disconnect instead."""
        pending = 0
        while pending <= self.config.max_header_bytes:
            try:
                # Wait on the socket itself: this task waits here for the whole of a stream, and
                # a pending receive_some holds several more frames (1.5 KB per parked stream).
                data = await (self._receive() if self.fd < 0 else self._receive_ready(self.fd))
            except ClientGone:
                return
            if not data:
                return
            pending += len(data)
            self._keep_pipelined(data)
        await trio.sleep_forever()

    def _keep_pipelined(self, data: bytes) -> None:
        """Keep bytes of a pipelined next request for the next :meth:`next_request`."""
        raise NotImplementedError

    @property
    def response_started(self) -> bool:
        raise NotImplementedError

    @property
    def can_respond(self) -> bool:
        raise NotImplementedError

    async def send_informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """A 1xx head before the response (103 Early Hints, 102 Processing), to an HTTP/1.1
        client only: RFC 9110 §15.2, an HTTP/1.0 client cannot tell it from the answer."""
        raise NotImplementedError

    async def send_head(self, status: int, headers: list[tuple[bytes, bytes]], *, flush: bool = True) -> None:
        """Send the response head; with ``flush=False`` it is held and goes out with the next write."""
        raise NotImplementedError

    def frame_data(self, data: bytes) -> bytes:
        """Response body bytes as they go on the wire (a chunk, or as they are), not sent."""
        raise NotImplementedError

    def frame_end(self) -> bytes:
        """The end of the response body as it goes on the wire (the last chunk, or nothing), not sent."""
        raise NotImplementedError

    @property
    def client_gets_chunked(self) -> bool:
        """Whether the current response body goes to the client in chunks (HTTP/1.1 client,
        no Content-Length, a body the status allows): the relay then passes chunks through."""
        raise NotImplementedError

    def send_failed(self) -> None:
        """A write failed or was given up: no more of this response, and no reuse."""
        raise NotImplementedError

    def abort(self) -> None:
        """Give up on the response: the client sees a truncated stream (no chunked terminator)."""
        raise NotImplementedError

    def hand_over(self) -> tuple[trio.abc.Stream, bytes]:
        """Give the connection to another protocol (a WebSocket after its upgrade was accepted):
        the stream, and the bytes received after the request head. HTTP on it is over:
        nothing more is sent or read here, and the server closes it when the handler returns."""
        raise NotImplementedError

    def reusable(self) -> bool:
        raise NotImplementedError

    def start_next_cycle(self) -> None:
        """Get ready for the next request on a kept-alive connection (after :meth:`reusable`)."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------

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

    def close_after_response(self) -> None:
        """Ask for ``Connection: close`` on the response (e.g. an unread body, or draining)."""
        self._close_after = True

    async def send_data(self, data: bytes, *, flush: bool = True) -> None:
        if data:
            self._unsent.append(self.frame_data(data))
        if flush:
            await self.flush()

    async def send_end(self) -> None:
        end = self.frame_end()
        if end:
            self._unsent.append(end)
        await self.flush()

    async def send_full(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole response in one write."""
        await self.send_head(status, headers, flush=False)
        await self.send_data(body, flush=False)
        await self.send_end()

    @property
    def socket(self) -> ClientSocket | None:
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
        if self.fd >= 0:
            try:
                sent = os.write(self.fd, data)  # the socket is non-blocking
            except BlockingIOError:
                pass
            except _SOCKET_ERRORS as exc:
                self.send_failed()
                raise _gone(exc) from exc
            self.bytes_out += sent
        if sent == len(data):
            return
        rest = memoryview(data)[sent:] if sent else data
        try:
            with trio.CancelScope(deadline=trio.current_time() + self.config.client_write_timeout) as scope:
                await self._send_rest(rest)
        except _SOCKET_ERRORS as exc:
            self.send_failed()
            raise _gone(exc) from exc
        if scope.cancelled_caught:
            self.send_failed()
            raise ClientGone(f"client did not read the response for {self.config.client_write_timeout:g} s")

    async def _send_rest(self, data: bytes | memoryview) -> None:
        """Write all of ``rest`` (``send_all``'s semantics), waiting for the socket when it is full."""
        fd = self.fd
        if fd < 0:  # an in-memory stream (tests, benches)
            await self.stream.send_all(data)
            self.bytes_out += len(data)
            return
        rest = memoryview(data)
        while rest:
            await wait_writable(fd)  # a checkpoint: a cancelled or timed-out write stops here
            try:
                sent = os.write(fd, rest)
            except BlockingIOError:
                continue
            self.bytes_out += sent
            rest = rest[sent:]


_DONE = trio.Event()  # a request_done asked for after its body was read: already set
_DONE.set()

_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def header_fields(headers: Sequence[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Name → value, repeated headers joined with ``, `` in order (what :meth:`RequestHead.header` reads)."""
    fields = dict(headers)  # one C call; as many entries as headers: no name is repeated, done
    if len(fields) == len(headers):
        return fields
    fields = {}
    for name, value in headers:
        fields[name] = fields[name] + b", " + value if name in fields else value
    return fields


def check_head(headers: Sequence[tuple[bytes, bytes]], *, controls: bool = True) -> dict[bytes, bytes]:
    """What h11 lets through but a proxy must refuse (then close the connection after answering);
    returns the head's :func:`header_fields`.

    * Content-Length and Transfer-Encoding together (RFC 9112 6.1): h11 frames the body by
      Transfer-Encoding, and the client's Content-Length could be passed on beside a body of
      another length.
    * A control character in a header value: h11 unfolds an obsolete folded line (RFC 9112 5.2)
      without checking it, and the value would reach the upstream, or a log viewer. ``controls=False``
      skips this for a head llhttp read: it refuses every control character but HTAB in a value
      (tests/unit/http/test_parsers.py holds it to that), and such a head is then h11's to read.
    """
    fields = header_fields(headers)
    if b"transfer-encoding" in fields and b"content-length" in fields:
        raise BadRequest(
            "malformed HTTP request: both Content-Length and Transfer-Encoding are present; send one",
            code="malformed_http",
        )
    # One search over every value (HTAB, allowed, joins them); the loop only names the culprit.
    if controls and _CONTROL.search(b"\t".join(fields.values())):
        for name, value in headers:
            if _CONTROL.search(value):
                raise BadRequest(
                    f"malformed HTTP request: header {client_text(name, 64, quoted=False)} has a control character "
                    "(or an obsolete folded line)",
                    code="malformed_http",
                )
    return fields
