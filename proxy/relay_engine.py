"""Moving a response body from the upstream socket to the client socket: the relay's hot path.

A :class:`RelayStream` is one response body in flight. It decides what each read becomes:

* upstream ``chunked`` to an HTTP/1.1 client: the bytes pass through unchanged, and the pure
  :class:`~proxy.chunked.ChunkScanner` finds the terminator, refuses broken framing and gives the
  observers the de-framed data; the terminator that passed through is the one h11 would have
  written, so both h11 connections are then completed with it (RFC 9112 §7.1);
* every other case (a fixed length, a body that ends at the close, an HTTP/1.0 client) goes
  through h11 on both sides, as before: these are small answers or rare clients.

Two drivers run the same streams. :class:`EpollEngine` (Linux) is one task of the app's
nursery that owns an epoll set holding every relayed upstream socket and client socket: one
trio wake-up relays every ready socket, with no trio task switch, cancel scope or stream layer
per event. The request's own task sleeps in :meth:`EpollEngine.relay` until its body is done,
and cancelling it (client gone, overall timeout, drain deadline, shutdown) takes its stream
out of the set at once. :func:`relay_portable` is the same relay in the request's task, one
wake-up per event, for platforms without epoll (and tests that compare the two paths).

Back pressure: when the client's socket does not take a whole write, the upstream socket leaves
the set (it is no longer read) until the client has taken the rest; nothing else is buffered,
and no other stream waits for it. Observers are fed after the write, guarded, and cost nothing
when there are none.
"""

from __future__ import annotations

import os
import select
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import h11
import outcome
import structlog
import trio

from .chunked import ChunkScanner, Framing
from .errors import ParkwayError, UpstreamProtocolError, UpstreamTimeout
from .http_server import ClientGone

if TYPE_CHECKING:
    from .http_server import HTTPConnection
    from .upstream_conn import UpstreamConnection

log = structlog.get_logger("parkway.relay")

_IN, _OUT, _RDHUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP
_GONE = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
WAIT, WROTE, BLOCKED, DONE = range(4)


class BodyObserver(Protocol):
    def feed(self, data: bytes) -> None: ...

    def finish(self, complete: bool) -> None: ...


class RelayStream:
    """One response body from ``upstream`` to ``conn``'s client, after its head was sent."""

    __slots__ = (
        "_down_h11",
        "_up_h11",
        "blocked_since",
        "client_fd",
        "complete",
        "conn",
        "framing",
        "host",
        "idle_timeout",
        "last_read",
        "observers",
        "passthrough",
        "pending",
        "relayed",
        "reusable",
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
    ):
        self.conn = conn
        self.up = upstream
        self.host = upstream.host
        self.framing = framing
        self._up_h11 = upstream.h11
        self._down_h11 = conn.conn
        # The framing going out is the framing coming in: h11 would chunk the answer for this client.
        self.passthrough = framing.kind == "chunked" and _client_gets_chunked(conn.conn)
        self.scanner = ChunkScanner() if framing.kind == "chunked" else None
        self.observers = tuple(observers)
        self.pending: memoryview | None = None  # what the client's socket has not taken yet
        self.unobserved: list[bytes] = []  # de-framed data written but not yet fed to observers
        sock = conn._socket
        self.client_fd = sock.fileno() if sock is not None else -1
        self.last_read = trio.current_time()
        self.blocked_since = 0.0
        self.relayed = 0
        self.complete = False
        self.reusable = False  # the upstream connection may carry another request
        self.task: trio.lowlevel.Task | None = None
        self.idle_timeout = idle_timeout
        self.write_timeout = conn.config.client_write_timeout

    # --- reading ----------------------------------------------------------------------------

    def start(self, initial: bytes) -> int:
        """Relay the body bytes that came with the head; a body that cannot exist ends here."""
        if self.framing.kind == "empty":
            try:
                event = self._up_h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(f"{self.host} broke the HTTP protocol: {exc}") from None
            self._ended(excess=len(initial) if type(event) is h11.EndOfMessage else 1)
            return self._write(self._down_h11.send(h11.EndOfMessage()) or b"")
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
            out = data
            if self.scanner.done:
                out = data[:used] if used != len(data) else data
                self._end_chunked(excess=len(data) - used)
                self._down_h11.send(h11.EndOfMessage())  # its terminator is the one that passed through
        else:
            out = self._reframe(data, observed)
        state = self._write(out)
        if observed:
            if state == BLOCKED:  # fed once the client has taken it
                self.unobserved += observed
            else:
                self._observe(observed)
        return state

    def _reframe(self, data: bytes, observed: list[bytes] | None) -> bytes:
        """h11 on both sides: de-frame what the upstream sent, frame it for this client."""
        pieces: list[bytes] = []
        if self.scanner is not None:  # chunked upstream, HTTP/1.0 client
            if not data:
                raise UpstreamProtocolError(f"{self.host} closed the connection in the middle of the response")
            used = self.scanner.feed(data, pieces)
            if self.scanner.done:
                self._end_chunked(excess=len(data) - used)
        else:
            up = self._up_h11
            try:
                up.receive_data(data)
                while True:
                    event = up.next_event()
                    if type(event) is h11.Data:
                        pieces.append(bytes(event.data))
                    elif type(event) is h11.EndOfMessage:
                        self._ended(excess=len(up.trailing_data[0]))
                        break
                    else:
                        break
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(f"{self.host} broke the HTTP protocol: {exc}") from None
        down = self._down_h11
        out = [down.send(h11.Data(data=p)) or b"" for p in pieces if p]
        if self.complete:
            out.append(down.send(h11.EndOfMessage()) or b"")
        if observed is not None:
            observed += pieces
        return out[0] if len(out) == 1 else b"".join(out)

    def _end_chunked(self, excess: int) -> None:
        assert self.scanner is not None
        up = self._up_h11
        try:
            up.receive_data(self.scanner.terminator)
            event = up.next_event()
        except h11.RemoteProtocolError as exc:
            raise UpstreamProtocolError(f"{self.host} sent malformed trailers: {exc}") from None
        if type(event) is not h11.EndOfMessage:  # the scanner and h11 disagree: never reuse
            excess = 1
        self._ended(excess)

    def _ended(self, excess: int) -> None:
        """The upstream's end of body arrived; keep its connection only when nothing else did."""
        self.complete = True
        up = self._up_h11
        # RFC 9112 §6.1/§9.3: stray bytes after a complete response (pipelined junk, a body on a
        # response that has none) are never taken as the next answer; nginx drops them too.
        self.reusable = not excess and self.framing.reusable and up.our_state is h11.DONE and up.their_state is h11.DONE
        if excess:
            log.warning("upstream_stray_bytes", upstream_host=self.host, bytes=excess)

    # --- writing ----------------------------------------------------------------------------

    def _write(self, out: bytes) -> int:
        conn = self.conn
        if conn._unsent:  # a held head goes out with the first body bytes
            out = b"".join([*conn._unsent, out])
            conn._unsent.clear()
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
                self._down_h11.send_failed()
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
            self._down_h11.send_failed()
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
        self._down_h11.send_failed()
        return ClientGone(f"client did not read the response for {self.write_timeout:g} s")


def _client_gets_chunked(server: h11.Connection) -> bool:
    """Whether h11 frames the current response to this client with chunks (its writer's choice,
    read back from the head it sent: ``Transfer-Encoding: chunked`` is only there when it did)."""
    return type(server._writer).__name__ == "ChunkedWriter"


# --- the portable driver: the relay in the request's own task ------------------------------------


async def relay_portable(stream: RelayStream, initial: bytes) -> None:
    """Relay ``stream`` (``initial``: body bytes that came with the head) in the calling task."""
    state = stream.start(initial)
    up = stream.up
    idle, slack = stream.idle_timeout, min(1.0, stream.idle_timeout / 8)
    try:
        with trio.CancelScope(deadline=trio.current_time() + idle + slack) as gap:
            while state != DONE:
                if state == BLOCKED:
                    stream.blocked_since = trio.current_time()
                    gap.deadline = stream.blocked_since + stream.write_timeout + slack
                    with trio.move_on_after(stream.write_timeout) as write:
                        if stream.client_fd < 0:
                            assert stream.pending is not None
                            try:
                                await stream.conn.stream.send_all(stream.pending)
                            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                                stream.conn.conn.send_failed()
                                raise ClientGone(str(exc) or type(exc).__name__) from None
                            state = stream.sent_all()
                        while state == BLOCKED:
                            await trio.lowlevel.wait_writable(stream.conn._socket)
                            state = stream.on_client_writable()
                    if write.cancelled_caught:
                        raise stream.write_timeout_error()
                    now = trio.current_time()
                    gap.deadline = now + idle + slack
                    continue
                await trio.lowlevel.wait_readable(up.sock)
                state = stream.on_upstream(up.recv_nowait())
                if state == WROTE:
                    now = trio.current_time()
                    if not now + idle <= gap.deadline <= now + idle + slack:
                        gap.deadline = now + idle + slack
        if gap.cancelled_caught:
            raise stream.idle_error()
    finally:
        stream.finish_observers()


# --- the epoll driver: one task, every stream ------------------------------------------------------


class EpollEngine:
    """One task owning an epoll set of every relayed socket; :meth:`relay` hands it a stream."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._streams: dict[int, RelayStream] = {}  # fd (upstream's and client's) -> stream
        self._tick = 1.0

    @property
    def running(self) -> bool:
        return self._epoll is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay until cancelled; streams still in flight then end with :class:`UpstreamProtocolError`."""
        epoll = select.epoll()
        self._epoll = epoll
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sweep_timeouts)
                task_status.started()
                await self._loop(epoll)
        finally:
            self._epoll = None
            for stream in list(dict.fromkeys(self._streams.values())):
                self._finish(stream, UpstreamProtocolError("the relay engine stopped"))
            trio.lowlevel.notify_closing(epoll.fileno())
            epoll.close()

    async def relay(self, stream: RelayStream, initial: bytes) -> None:
        """Relay ``stream`` to its end; returns when its body is complete, raises on failure.

        Cancelling the caller removes the stream at once (its sockets are then the caller's to close).
        """
        state = stream.start(initial)
        if state == DONE:
            stream.finish_observers()
            return
        epoll = self._epoll
        assert epoll is not None
        stream.task = trio.lowlevel.current_task()
        streams = self._streams
        streams[stream.up.fd] = streams[stream.client_fd] = stream
        if state == BLOCKED:
            stream.blocked_since = trio.current_time()
            epoll.register(stream.up.fd, 0)
            epoll.register(stream.client_fd, _OUT | _RDHUP)
        else:
            epoll.register(stream.up.fd, _IN)
            epoll.register(stream.client_fd, _RDHUP)
        self._tick = min(self._tick, stream.idle_timeout / 8, stream.write_timeout / 8)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._remove(stream)
            stream.finish_observers()
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def _loop(self, epoll: select.epoll) -> None:
        epfd = epoll.fileno()
        poll = epoll.poll
        streams = self._streams
        while True:
            await trio.lowlevel.wait_readable(epfd)
            now = trio.current_time()
            for fd, events in poll(0):
                stream = streams.get(fd)
                if stream is None:
                    continue
                try:
                    if fd != stream.client_fd:
                        stream.last_read = now
                        state = stream.on_upstream(stream.up.recv_nowait())
                    elif events & _GONE and not events & _OUT:
                        raise ClientGone("client closed the connection before the response was complete")
                    else:
                        state = stream.on_client_writable()
                        if state == WROTE:
                            stream.last_read = now
                            epoll.modify(stream.client_fd, _RDHUP)
                            epoll.modify(stream.up.fd, _IN)
                    if state == DONE:
                        self._finish(stream, None)
                    elif state == BLOCKED and fd != stream.client_fd:
                        stream.blocked_since = now
                        epoll.modify(stream.up.fd, 0)  # back pressure: stop reading this upstream
                        epoll.modify(stream.client_fd, _OUT | _RDHUP)
                except Exception as exc:  # noqa: BLE001 - one stream's failure, delivered to its task
                    self._finish(stream, exc)

    async def _sweep_timeouts(self) -> None:
        """Idle upstreams and clients that stopped reading, checked every ``tick`` (≤ 1 s, and
        an eighth of the shortest limit): a limit is enforced within ``tick`` after it passes."""
        while True:
            await trio.sleep(self._tick)
            now = trio.current_time()
            for stream in list(dict.fromkeys(self._streams.values())):
                if stream.pending is not None:
                    if now - stream.blocked_since > stream.write_timeout:
                        self._finish(stream, stream.write_timeout_error())
                elif now - stream.last_read > stream.idle_timeout:
                    self._finish(stream, stream.idle_error())

    def _remove(self, stream: RelayStream) -> None:
        epoll = self._epoll
        for fd in (stream.up.fd, stream.client_fd):
            if self._streams.pop(fd, None) is not None and epoll is not None:
                try:
                    epoll.unregister(fd)
                except OSError:
                    pass

    def _finish(self, stream: RelayStream, error: BaseException | None) -> None:
        self._remove(stream)
        task, stream.task = stream.task, None
        stream.finish_observers()
        if task is None:
            return
        if error is not None and not isinstance(error, (ParkwayError, ClientGone)):
            log.error("relay_failed", upstream_host=stream.host, exc_info=error)
        trio.lowlevel.reschedule(task, outcome.Value(None) if error is None else outcome.Error(error))
