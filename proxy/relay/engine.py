"""The relay's two drivers: who waits for the sockets of the :class:`~proxy.relay.stream.RelayStream` s.

:class:`EpollEngine` (Linux) is one task of the app's nursery that owns an epoll set holding
every relayed upstream socket and client socket: one trio wake-up relays every ready socket,
with no trio task switch, cancel scope or stream layer per event. The request's own task
sleeps in :meth:`EpollEngine.relay` until its body is done, and cancelling it (overall
timeout, drain deadline, shutdown) takes its stream out of the set at once. The engine also
watches each client for leaving (``EPOLLRDHUP``) and stops reading an upstream whose client
is not taking what it was sent (back pressure), without slowing any other stream.

:func:`relay_portable` is the same relay in the request's own task, one wake-up per event:
for platforms without epoll, in-memory client streams, and the tests that run every case on
both drivers.
"""

from __future__ import annotations

import select
from collections.abc import Callable

import outcome
import structlog
import trio

from ..errors import ParkwayError, UpstreamProtocolError
from ..http.connection import ClientGone
from .stream import BLOCKED, DONE, WROTE, RelayStream

log = structlog.get_logger("parkway.relay")

# Linux's epoll flags; elsewhere this module is imported but EpollEngine is never started.
_IN, _OUT, _RDHUP = (getattr(select, f"EPOLL{n}", 0) for n in ("IN", "OUT", "RDHUP"))
_GONE = _RDHUP | getattr(select, "EPOLLHUP", 0) | getattr(select, "EPOLLERR", 0)
# A client watched for leaving: reported once, then disarmed by the kernel (EPOLLONESHOT), so a
# departure needs no EPOLL_CTL_DEL (the socket's close takes it out of the set).
_WATCH = _RDHUP | getattr(select, "EPOLLONESHOT", 0)


# --- the portable driver: the relay in the request's own task ------------------------------------


async def relay_portable(stream: RelayStream, initial: bytes) -> None:
    """Relay ``stream`` (``initial``: body bytes that came with the head) in the calling task."""
    state = stream.start(initial)
    if state == DONE:  # the whole body came with the head (a small answer): no wait, no scope
        stream.finish_observers()
        return
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
                                stream.conn.send_failed()
                                raise ClientGone(str(exc) or type(exc).__name__) from None
                            state = stream.sent_all()
                        while state == BLOCKED:
                            await trio.lowlevel.wait_writable(stream.client_fd)
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
        self._watched: dict[int, Callable[[], None]] = {}  # client fd -> what to call when it leaves
        # Client fds left registered (armed, ``_WATCH``) between the requests of a kept-alive
        # connection, each with its socket (a closed one's number may come back with a new
        # connection, whose fd is then no longer in the set): that connection's next request
        # is watched with no system call. Closing the socket removes it from the set.
        self._kept: dict[int, object] = {}
        self._tick = 1.0
        self.running = False  # while run() owns the epoll set (an attribute: read on every request)
        # The run's clock, bound by run(): one frame a read (trio.current_time is three).
        self._now: Callable[[], float] = trio.current_time

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay until cancelled; streams still in flight then end with :class:`UpstreamProtocolError`."""
        epoll = select.epoll()
        self._epoll = epoll
        self._now = trio.lowlevel.current_clock().current_time
        self.running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sweep_timeouts)
                task_status.started()
                await self._loop(epoll)
        finally:
            self._epoll = None
            self.running = False
            self._watched.clear()
            self._kept.clear()
            for stream in list(dict.fromkeys(self._streams.values())):
                self._finish(stream, UpstreamProtocolError("the relay engine stopped"))
            trio.lowlevel.notify_closing(epoll.fileno())
            epoll.close()

    def watch_client(self, fd: int, gone: Callable[[], None], owner: object) -> bool:
        """Call ``gone`` (from the engine's task) once the client on ``fd`` (``owner``: its
        socket) closes its side, until :meth:`unwatch_client` or a relay on it takes over. One
        epoll registration per connection instead of a watcher task per request. False when the
        engine is not running (watch some other way)."""
        epoll = self._epoll
        if epoll is None or fd in self._watched or fd in self._streams:
            return False
        if self._kept.get(fd) is owner:  # registered since this connection's last request
            del self._kept[fd]
        else:
            self._claim(epoll, fd, _WATCH, owner)
        self._watched[fd] = gone
        return True

    def unwatch_client(self, fd: int, owner: object) -> None:
        """Stop watching; the registration stays (see ``_kept``) for the connection's next request."""
        if self._watched.pop(fd, None) is not None and self._epoll is not None:
            self._kept[fd] = owner

    def _claim(self, epoll: select.epoll, fd: int, events: int, owner: object) -> None:
        """Register a client fd (``owner``: its socket), or modify the registration its connection
        kept. A kept fd of another socket was closed, so it left the set (its number came back
        with a new connection): registered with no failing modify first."""
        if self._kept.pop(fd, None) is owner:
            try:
                epoll.modify(fd, events)
                return
            except FileNotFoundError:
                pass
        try:
            epoll.register(fd, events)
        except FileExistsError:  # this connection's watch fired (and disarmed itself) earlier
            epoll.modify(fd, events)

    def _keep(self, epoll: select.epoll, stream: RelayStream) -> None:
        """Leave a stream's client fd registered (armed, ``_WATCH``) for its connection's next request."""
        fd, events = stream.client_fd, stream.client_events
        if not events:  # its watch fired: the client has left, the connection ends
            return
        if events != _WATCH:
            try:
                epoll.modify(fd, _WATCH)
            except OSError:  # already gone from the set (closed)
                return
        self._kept[fd] = stream.conn.socket

    async def relay(self, stream: RelayStream, initial: bytes) -> None:
        """Relay ``stream`` to its end; returns when its body is complete, raises on failure.

        Cancelling the caller removes the stream at once (its sockets are then the caller's to close).
        """
        state = stream.start(initial)
        if state == DONE:
            stream.finish_observers()
            return
        await self.follow(stream, state)

    async def follow(self, stream: RelayStream, state: int) -> None:
        """:meth:`relay` of a stream already started (``state``: what :meth:`RelayStream.start` left, not DONE)."""
        epoll = self._epoll
        assert epoll is not None
        stream.task = trio.lowlevel.current_task()
        streams = self._streams
        streams[stream.up.fd] = streams[stream.client_fd] = stream
        # A watched client stays registered: the stream takes the registration over.
        watched = self._watched.pop(stream.client_fd, None) is not None
        client_events = _OUT | _RDHUP if state == BLOCKED else _WATCH
        stream.last_read = self._now()  # the idle limit counts from here (the sweep reads it)
        if state == BLOCKED:
            stream.blocked_since = stream.last_read
            epoll.register(stream.up.fd, 0)
        else:
            epoll.register(stream.up.fd, _IN)
        if watched:
            if client_events != _WATCH:  # a watched client is registered (armed) already
                epoll.modify(stream.client_fd, client_events)
        else:
            self._claim(epoll, stream.client_fd, client_events, stream.conn.socket)
        stream.client_events = client_events
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
        clock = self._now
        while True:
            await trio.lowlevel.wait_readable(epfd)
            now = clock()
            for fd, events in poll(0):
                stream = streams.get(fd)
                if stream is None:
                    # A watch fired (and disarmed itself): nothing more comes from this fd.
                    if self._kept.pop(fd, None) is not None:  # a client between requests left (or HUP, ERR)
                        continue
                    gone = self._watched.pop(fd, None)
                    if gone is not None:  # a client left while its request waited (queue, upstream head)
                        try:
                            gone()
                        except Exception:
                            log.exception("client_watch_failed")
                    continue
                try:
                    if fd != stream.client_fd:
                        stream.last_read = now
                        state = stream.on_upstream(stream.up.recv_nowait())
                    elif events & _GONE and not events & _OUT:
                        if stream.client_events == _WATCH:
                            stream.client_events = 0  # fired once: disarmed
                        raise ClientGone("client closed the connection before the response was complete")
                    else:
                        state = stream.on_client_writable()
                        if state == WROTE:
                            stream.last_read = now
                            epoll.modify(stream.client_fd, _WATCH)
                            stream.client_events = _WATCH
                            epoll.modify(stream.up.fd, _IN)
                    if state == DONE:
                        self._finish(stream, None)
                    elif state == BLOCKED and fd != stream.client_fd:
                        stream.blocked_since = now
                        epoll.modify(stream.up.fd, 0)  # back pressure: stop reading this upstream
                        epoll.modify(stream.client_fd, _OUT | _RDHUP)
                        stream.client_events = _OUT | _RDHUP
                except Exception as exc:  # noqa: BLE001 - one stream's failure, delivered to its task
                    self._finish(stream, exc)

    async def _sweep_timeouts(self) -> None:
        """Idle upstreams and clients that stopped reading, checked every ``tick`` (≤ 1 s, and
        an eighth of the shortest limit): a limit is enforced within ``tick`` after it passes."""
        while True:
            await trio.sleep(self._tick)
            now = self._now()
            for stream in list(dict.fromkeys(self._streams.values())):
                if stream.pending is not None:
                    if now - stream.blocked_since > stream.write_timeout:
                        self._finish(stream, stream.write_timeout_error())
                elif now - stream.last_read > stream.idle_timeout:
                    self._finish(stream, stream.idle_error())

    def _remove(self, stream: RelayStream) -> None:
        epoll = self._epoll
        if self._streams.pop(stream.up.fd, None) is not None and epoll is not None:
            try:
                epoll.unregister(stream.up.fd)
            except OSError:
                pass
        if self._streams.pop(stream.client_fd, None) is not None and epoll is not None:
            self._keep(epoll, stream)

    def _finish(self, stream: RelayStream, error: BaseException | None) -> None:
        self._remove(stream)
        task, stream.task = stream.task, None
        stream.finish_observers()
        if task is None:
            return
        if error is not None and not isinstance(error, (ParkwayError, ClientGone)):
            log.error("relay_failed", upstream_host=stream.host, exc_info=error)
        trio.lowlevel.reschedule(task, outcome.Value(None) if error is None else outcome.Error(error))
