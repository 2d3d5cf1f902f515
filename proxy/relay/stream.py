"""One response body in flight: what each upstream read becomes on the client's socket.

:class:`RelayStream` decides, without waiting for anything (its drivers in
:mod:`proxy.relay.engine` wait for the sockets):

* upstream ``chunked`` to an HTTP/1.1 client: the bytes pass through unchanged, and the pure
  :class:`~proxy.http.chunked.ChunkScanner` finds the terminator, refuses broken framing and gives the
  observers the de-framed data; chunk extensions are dropped (a size line goes on as bare hex),
  the terminator is held until complete and then written with its trailers filtered by the
  response header policy (no ``Set-Cookie``, no hop-by-hop field), and both sides' states
  are completed with it (RFC 9112 §7.1);
* every other case (a fixed length, a body that ends at the close, an HTTP/1.0 client) is
  de-framed by the upstream connection (``deframe``) and framed anew by the client connection
  (``frame_data``/``frame_end``), whichever implementation each is: small answers or rare clients.

Each step is one ``recv`` and one ``write`` on the raw sockets. When the client's socket does
not take a whole write, the rest waits in :attr:`RelayStream.pending` and the driver stops
reading the upstream until it is gone (back pressure: one read at most, no queue). Observers
are fed the de-framed data after the write, guarded, and cost nothing when there are none.
The upstream connection is reusable only when the body ended cleanly with nothing after it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import structlog
import trio

from .. import forwarding
from ..errors import UpstreamProtocolError, UpstreamTimeout
from ..http.chunked import ChunkScanner, Framing
from ..http.connection import ClientGone
from ..upstream.wire import BrokenResponse

if TYPE_CHECKING:
    from ..http.connection import HTTPConnection
    from ..upstream.connection import UpstreamConnection

log = structlog.get_logger("parkway.relay")

WAIT, WROTE, BLOCKED, DONE = range(4)  # what a step left: nothing read, all written, client full, body done


class BodyObserver(Protocol):
    def feed(self, data: bytes) -> None: ...

    def finish(self, complete: bool) -> None: ...


class BodyRewrite(Protocol):
    """Changes the de-framed body on its way (the budget's usage chunk taken out): ``feed``
    returns what to send for each piece, ``end`` what is left once the body is complete."""

    def feed(self, data: bytes) -> bytes: ...

    def end(self) -> bytes: ...


class RelayStream:
    """One response body from ``upstream`` to ``conn``'s client, after its head was sent."""

    __slots__ = (
        "_up_http",
        "blocked_since",
        "client_events",
        "client_fd",
        "complete",
        "conn",
        "first_write",
        "framing",
        "host",
        "idle_timeout",
        "last_read",
        "observers",
        "passthrough",
        "pending",
        "relayed",
        "reusable",
        "rewrite",
        "scanner",
        "task",
        "unobserved",
        "up",
        "write_timeout",
    )  # fmt: skip

    def __init__(
        self,
        conn: HTTPConnection,
        upstream: UpstreamConnection,
        framing: Framing,
        *,
        idle_timeout: float,
        observers: Sequence[BodyObserver] = (),
        rewrite: BodyRewrite | None = None,
    ):
        self.conn = conn
        self.up = upstream
        self.host = upstream.host
        self.framing = framing
        self._up_http = upstream.http
        # The framing going out is the framing coming in: the client connection would chunk this answer.
        # A rewrite changes the body, so it is framed anew (never with a fixed length).
        self.rewrite = rewrite if framing.kind in ("chunked", "close") else None
        self.passthrough = framing.kind == "chunked" and conn.client_gets_chunked and self.rewrite is None
        self.scanner = ChunkScanner() if framing.kind == "chunked" else None
        self.observers = tuple(observers)
        self.pending: memoryview | None = None  # what the client's socket has not taken yet
        self.unobserved: list[bytes] = []  # de-framed data written but not yet fed to observers
        self.client_fd = conn.fd
        self.last_read = 0.0  # the engine's: set when it takes the stream (a small answer ends before)
        self.blocked_since = 0.0
        self.client_events = 0  # the engine's: what the client's fd is registered for (0: nothing armed)
        self.relayed = 0
        self.complete = False
        self.reusable = False  # the upstream connection may carry another request
        self.task: trio.lowlevel.Task | None = None
        self.idle_timeout = idle_timeout
        self.write_timeout = conn.config.client_write_timeout
        self.first_write = True

    # --- reading ----------------------------------------------------------------------------

    def start(self, initial: bytes) -> int:
        """Relay the body bytes that came with the head; a body that cannot exist, or has
        ``Content-Length: 0``, ends here (nothing more is awaited from the upstream)."""
        if self.framing.bodiless:
            try:
                excess = self._up_http.end_bodiless(initial)
            except BrokenResponse as exc:
                raise UpstreamProtocolError(f"{self.host} broke the HTTP protocol: {exc}") from None
            self._ended(excess)
            return self._write(self.conn.frame_end())
        return self.on_upstream(initial) if initial else WROTE

    def on_upstream(self, data: bytes | None) -> int:
        """Relay what one read gave (``b""``: the upstream closed; None: nothing yet)."""
        if data is None:
            return WAIT
        observed: list[bytes] | None = [] if self.observers else None
        if self.passthrough:
            assert self.scanner is not None
            if not data:
                raise UpstreamProtocolError(f"{self.host} closed the connection in the middle of the response")
            used = self.scanner.feed(data, observed)
            out = data if self.scanner.rewritten is None else self._rewritten(data, used)
        else:
            out = self._reframe(data, observed)
        state = self._write(out)
        if observed:
            if state == BLOCKED:  # fed once the client has taken it
                self.unobserved += observed
            else:
                self._observe(observed)
        return state

    def _rewritten(self, data: bytes, used: int) -> bytes:
        """Pass-through of a read the scanner changed (an extension dropped, a split size line or
        the terminator held); once the terminator is complete it goes with its trailers filtered
        (:func:`~proxy.forwarding.response_trailers`). Not the common read: one whole chunk."""
        scanner = self.scanner
        assert scanner is not None and scanner.rewritten is not None
        out, scanner.rewritten = scanner.rewritten, None
        if not scanner.done:
            return out
        self._end_chunked(excess=len(data) - used)
        self.conn.frame_end()  # the terminator written here completes the client's framing
        return out + b"0\r\n" + b"".join(forwarding.response_trailers(scanner.trailer_lines())) + b"\r\n"

    def _reframe(self, data: bytes, observed: list[bytes] | None) -> bytes:
        """De-frame what the upstream sent (the upstream connection), frame it for this client (the client connection)."""
        pieces: list[bytes] = []
        if self.scanner is not None:  # chunked upstream, HTTP/1.0 client
            if not data:
                raise UpstreamProtocolError(f"{self.host} closed the connection in the middle of the response")
            used = self.scanner.feed(data, pieces)
            if self.scanner.done:
                self._end_chunked(excess=len(data) - used)
        else:
            try:
                excess = self._up_http.deframe(data, pieces)
            except BrokenResponse as exc:
                raise UpstreamProtocolError(f"{self.host} broke the HTTP protocol: {exc}") from None
            if excess is not None:
                self._ended(excess)
        if self.rewrite is not None:
            pieces = [self.rewrite.feed(b"".join(pieces))]
            if self.complete:
                pieces.append(self.rewrite.end())
        conn = self.conn
        out = [conn.frame_data(p) for p in pieces if p]
        if self.complete:
            end = conn.frame_end()
            if end:  # nothing after a fixed length: the one piece goes as it is, not joined
                out.append(end)
        if observed is not None:
            observed += pieces
        return out[0] if len(out) == 1 else b"".join(out)

    def _end_chunked(self, excess: int) -> None:
        assert self.scanner is not None
        try:
            ended = self._up_http.end_chunked(self.scanner.canonical_terminator)
        except BrokenResponse as exc:
            raise UpstreamProtocolError(f"{self.host} sent malformed trailers: {exc}") from None
        if not ended:  # the scanner and the upstream's HTTP/1.1 disagree: never reuse
            excess = 1
        self._ended(excess)

    def _ended(self, excess: int) -> None:
        """The upstream's end of body arrived; keep its connection only when nothing else did."""
        self.complete = True
        # RFC 9112 §6.1/§9.3: stray bytes after a complete response (pipelined junk, a body on a
        # response that has none) are never taken as the next answer; nginx drops them too.
        self.reusable = not excess and self.framing.reusable and self._up_http.reusable()
        if excess:
            log.warning("upstream_stray_bytes", upstream_host=self.host, bytes=excess)

    # --- writing ----------------------------------------------------------------------------

    def _write(self, out: bytes) -> int:
        conn = self.conn
        if self.first_write:  # a held head goes out with the first body bytes
            self.first_write = False
            held = conn.take_unsent()
            if held:
                out = held + out
                self.relayed -= len(held)  # body bytes only
        sent = 0
        if out and self.client_fd < 0:  # not a socket (an in-memory stream): the driver sends it
            self.pending = memoryview(out)
            return BLOCKED
        if out:
            try:
                sent = os.write(self.client_fd, out)
            except BlockingIOError:
                pass
            except OSError as exc:
                self.conn.send_failed()
                raise ClientGone(exc.strerror or type(exc).__name__) from None
            conn.bytes_out += sent
            self.relayed += sent
            if sent != len(out):
                self.pending = memoryview(out)[sent:]
                return BLOCKED
        return DONE if self.complete else WROTE

    def on_client_writable(self) -> int:
        """Write what the client did not take; True once all of it went."""
        assert self.pending is not None
        try:
            sent = os.write(self.client_fd, self.pending)
        except BlockingIOError:
            return BLOCKED
        except OSError as exc:
            self.conn.send_failed()
            raise ClientGone(exc.strerror or type(exc).__name__) from None
        self.conn.bytes_out += sent
        self.relayed += sent
        if sent != len(self.pending):
            self.pending = self.pending[sent:]
            return BLOCKED
        self.pending = None
        if self.unobserved:
            self._observe(self.unobserved)
            self.unobserved = []
        return DONE if self.complete else WROTE

    def sent_all(self) -> int:
        """The driver sent what was pending by other means (a stream that is not a socket)."""
        assert self.pending is not None
        self.conn.bytes_out += len(self.pending)
        self.relayed += len(self.pending)
        self.pending = None
        if self.unobserved:
            self._observe(self.unobserved)
            self.unobserved = []
        return DONE if self.complete else WROTE

    def _observe(self, pieces: list[bytes]) -> None:
        for observer in self.observers:
            try:
                for piece in pieces:
                    observer.feed(piece)
            except Exception:
                log.exception("observer_failed", observer=type(observer).__name__)
                self.observers = tuple(o for o in self.observers if o is not observer)

    def finish_observers(self) -> None:
        for observer in self.observers:
            try:
                observer.finish(self.complete and self.pending is None)
            except Exception:
                log.exception("observer_failed", observer=type(observer).__name__)
        self.observers = ()

    def idle_error(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"{self.host} sent nothing for {self.idle_timeout:g} s in the middle of the response")

    def write_timeout_error(self) -> ClientGone:
        self.conn.send_failed()
        return ClientGone(f"client did not read the response for {self.write_timeout:g} s")
