"""The listening side of the HTTP server: listening sockets, accept loops, one task per
connection, the connection cap and the graceful drain. Each connection is an
:class:`~proxy.http.connection.HTTPConnection` of the configured implementation
(:func:`open_connection`); this module never touches h11 itself.
"""

from __future__ import annotations

import errno
import math
import socket
import sys
import weakref
from typing import Protocol

import trio
from trio.lowlevel import checkpoint, wait_readable

from ..config import ServerConfig
from ..errors import InternalError, Overloaded, ParkwayError
from ..sweep import FIRED, Cancellable, Sweep, tick_for
from ..urls import split_host_port
from . import parsers
from .connection import _SOCKET_ERRORS, RECEIVE_SIZE, ClientGone, HeadInterrupted, HTTPConnection, RequestHead, log
from .h11_impl import H11Connection

try:
    from .httptools_impl import HttptoolsConnection
except ImportError:  # a bare install: h11 only
    HttptoolsConnection = None  # type: ignore[assignment,misc]

ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# What accept says about the connection it was about to return, not about the listener: skipped,
# as trio's SocketListener.accept skips them (a connection reset or refused before it was accepted).
SKIPPED_ACCEPT_ERRNOS = {
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
        "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT", "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
    )
    if hasattr(errno, name)
}  # fmt: skip
CLOSED_ERRNOS = {errno.EBADF, errno.ENOTSOCK}  # the listening socket was closed under the loop
ACCEPT_BATCH = 64  # connections accepted per wake-up of an accept loop, at most, before it yields

# The listening sockets open_listeners made, by listener: accepted from directly (_accept_batches).
_LISTENING: weakref.WeakKeyDictionary[trio.SocketListener, socket.socket] = weakref.WeakKeyDictionary()


class Application(Protocol):
    async def handle(self, head: RequestHead, conn: HTTPConnection) -> None: ...

    async def reject(self, head: RequestHead | None, conn: HTTPConnection, exc: ParkwayError) -> None: ...


def connection_class(config: ServerConfig) -> type[HTTPConnection]:
    """The implementation ``config.http`` resolves to (auto: httptools when installed, else h11)."""
    if parsers.resolve(config.http) == "httptools" and HttptoolsConnection is not None:
        return HttptoolsConnection
    return H11Connection


def open_connection(stream: trio.abc.Stream | socket.socket, config: ServerConfig, peer: str) -> HTTPConnection:
    """The client connection of :func:`connection_class`, on a stream or on an accepted socket itself."""
    return connection_class(config)(stream, config, peer)


class Server:
    """Accept loops and connection tasks, with a connection cap and a graceful drain."""

    def __init__(self, config: ServerConfig, app: Application):
        self.config = config
        self.app = app
        self.open_connections = 0
        self.draining = False
        # The connections waiting for a request head, each with its head's deadline (inf until
        # next_request sets one): shutdown cancels them all, the sweep those past their deadline.
        self.heads = Sweep(lambda: tick_for(self.config.header_read_timeout, self.config.keepalive_timeout))
        self._connections: trio.Nursery | None = None
        self._accepting: trio.CancelScope | None = None
        self._connection_class = connection_class(config)  # chosen once, not per connection

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :meth:`shutdown` has drained every connection (or the drain deadline hit)."""
        async with trio.open_nursery() as sweeping:
            await sweeping.start(self.heads.run)
            async with trio.open_nursery() as connections:
                self._connections = connections
                try:
                    with trio.CancelScope() as accepting:
                        self._accepting = accepting
                        async with trio.open_nursery() as accept_loops:
                            for listener in listeners:
                                accept_loops.start_soon(self._accept_loop, listener, connections)
                            task_status.started(listeners)
                finally:
                    with trio.CancelScope(shield=True):
                        for listener in listeners:
                            await listener.aclose()
                # From here the nursery waits for in-flight connections, up to the drain deadline.
            sweeping.cancel_scope.cancel()

    def shutdown(self) -> None:
        """Stop accepting, close idle keep-alive connections, cancel the rest after ``drain_timeout``."""
        if self.draining:
            return
        self.draining = True
        if self._accepting is not None:
            self._accepting.cancel()
        for waiting in list(self.heads.deadlines):  # a connection's scope, or the connection itself
            waiting.cancel()
        if self._connections is not None:
            self._connections.cancel_scope.deadline = trio.current_time() + self.config.drain_timeout

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        raw = _LISTENING.get(listener)
        if raw is not None:
            await self._accept_batches(raw, nursery)
            return
        while True:  # a listener from elsewhere (tests): trio's accept, one connection per call
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in ACCEPT_ERRNOS:
                    await _accept_failed(exc)
                    continue
                raise
            nursery.start_soon(self._connection_task, stream)

    async def _accept_batches(self, raw: socket.socket, nursery: trio.Nursery) -> None:
        """Accept from the listening socket itself: up to ``ACCEPT_BATCH`` connections per
        wake-up, until it has no more, then wait for it to be readable again (a full batch yields
        once first, so a burst cannot keep the streams already served waiting). trio's
        ``SocketListener.accept`` yields twice around every connection it returns (one per turn
        of the run loop), wraps each socket in a ``SocketStream`` and leaves the peer's address
        to a ``getpeername``: here the address comes with the connection, and the socket is the
        connection's own, the stdlib socket itself (:class:`~proxy.http.connection.HTTPConnection`
        makes a trio stream of it only if something needs one). On Linux it has its options
        already: an accepted socket inherits them from the listening one (:func:`open_listeners`)."""
        accept = raw.accept
        spawn = nursery.start_soon
        task = self._connection_task
        set_options = None if _INHERITS_OPTIONS else _set_options
        while True:
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, address = accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in SKIPPED_ACCEPT_ERRNOS:
                        continue
                    if exc.errno in CLOSED_ERRNOS:
                        raise trio.ClosedResourceError("the listening socket was closed") from None
                    if exc.errno in ACCEPT_ERRNOS:
                        await _accept_failed(exc)
                        break
                    raise
                sock.setblocking(False)
                if set_options is not None:
                    set_options(sock)
                spawn(task, sock, address[0])  # an IPv4 or IPv6 address: (host, port, ...)
            else:
                await checkpoint()  # a full batch: let the connections just taken, and the others, run
                continue
            await wait_readable(raw)

    async def _connection_task(self, stream: trio.abc.Stream | socket.socket, peer: str | None = None) -> None:
        if peer is None:  # a stream from trio's accept (or a test's listener)
            try:
                peer = stream.socket.getpeername()[0]  # type: ignore[union-attr]
            except OSError:
                peer = "unknown"
        conn = self._connection_class(stream, self.config, peer)
        self.open_connections += 1
        try:
            if self.open_connections > self.config.max_connections:
                await self._refuse_overloaded(conn)
                return
            await self._serve_connection(conn)
        except ClientGone:
            pass
        except Exception:
            # A bug must cost one connection, never the server and every other stream; the
            # client still gets an answer when none has started.
            log.exception("connection_failed", client=peer)
            await self._answer_internal_error(conn)
        finally:
            self.open_connections -= 1
            if not conn.request_complete and conn.response_started and not conn.handed_over:
                with trio.CancelScope(shield=True):
                    await _lingering_close(conn.stream)
            # Without trio.aclose_forcefully's cancelled scope and checkpoint (three scopes and a
            # turn of the run loop per connection): see close_socket.
            if not conn.close_socket():  # an in-memory stream (tests, benches)
                await trio.aclose_forcefully(conn.stream)

    async def _answer_internal_error(self, conn: HTTPConnection) -> None:
        """500 ``internal_error`` if a response can still be sent, else a truncated one."""
        if not conn.can_respond:
            conn.abort()
            return
        conn.close_after_response()
        with trio.move_on_after(self.config.client_write_timeout):
            try:
                await self.app.reject(None, conn, InternalError())
            except Exception:  # the answer itself failed: the connection just closes
                log.exception("internal_error_response_failed", client=conn.peer)

    async def _refuse_overloaded(self, conn: HTTPConnection) -> None:
        exc = Overloaded(
            f"too many open connections (limit {self.config.max_connections}); retry shortly", retry_after=1
        )
        with trio.move_on_after(self.config.header_read_timeout):
            head = await conn.next_request(self.config.header_read_timeout)
            conn.close_after_response()
            await self.app.reject(head, conn, exc)

    async def _serve_connection(self, conn: HTTPConnection) -> None:
        # The connection's head waits are stopped through the heads' table, where it is only
        # while it waits for a head: shutdown cancels it there, and so does the sweep once the
        # head's deadline, which next_request enters there, has passed (no trio deadline to set
        # and lift per request). On a socket the server accepted the table holds the connection
        # itself (HTTPConnection.cancel: no cancel scope per connection, ~30 calls); otherwise
        # one scope for the connection's whole life. A head that arrived as the wait was
        # stopped (shutdown, or its deadline just then; nothing raised) is answered outside
        # the scope, as the last on its connection; so is a refused one.
        first = True
        head: RequestHead | None = None
        refusal: ParkwayError | None = None
        interrupted = False
        # (Served outside serve(), as some tests do, the deadlines are the scope's own.)
        heads = self.heads if self.heads.running else Sweep.on_scopes()
        deadlines = heads.deadlines
        idle: trio.CancelScope | _NoScope
        if conn.fd >= 0 and heads is self.heads:
            key: Cancellable = conn
            idle = _NO_SCOPE
        else:
            key = idle = trio.CancelScope()
        with idle:
            while not self.draining:
                deadlines[key] = math.inf
                try:
                    head = await conn.next_request(
                        self.config.header_read_timeout if first else self.config.keepalive_timeout, key, heads
                    )
                except ParkwayError as exc:  # malformed head, too large
                    refusal = exc
                    break
                except HeadInterrupted:  # what the scope's cancellation is, without a scope
                    interrupted = True
                    break
                finally:
                    fired = deadlines[key] == FIRED  # the head's deadline passed as it came
                    del deadlines[key]
                if head is None or self.draining or fired:
                    break
                first = False
                await self.app.handle(head, conn)
                if not conn.reusable():
                    return
                conn.start_next_cycle()
                head = None
        interrupted = interrupted or idle.cancelled_caught
        if interrupted and not self.draining:  # the head's deadline: too slow, or idle
            refusal = conn.head_timeout()
        if refusal is not None:
            # Answered outside the scope: shutdown leaves a refusal to the drain.
            if conn.can_respond:
                conn.close_after_response()
                await self.app.reject(None, conn, refusal)
            return
        if head is not None and not interrupted:
            conn.close_after_response()
            await self.app.handle(head, conn)


class _NoScope:
    """In place of the scope of a connection whose head waits are stopped without one."""

    cancelled_caught = False

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SCOPE = _NoScope()


async def _accept_failed(exc: OSError) -> None:
    """Out of descriptors or memory: say so, and try again in a moment (the backlog holds the rest)."""
    log.error("accept_failed", error=errno.errorcode.get(exc.errno or 0, str(exc.errno)), retry_in=0.1)
    await trio.sleep(0.1)


def _set_options(sock: socket.socket) -> None:
    """The options trio's SocketStream sets on a connection: no Nagle delay (an event goes out
    when written), and at most 16 KB unsent in the kernel before the socket counts as full."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _NOTSENT_LOWAT is not None:  # Linux and macOS; trio sets it where the platform has it
            sock.setsockopt(socket.IPPROTO_TCP, _NOTSENT_LOWAT, 1 << 14)
    except OSError:  # a connection already reset: its first read says so
        pass


_NOTSENT_LOWAT: int | None = getattr(socket, "TCP_NOTSENT_LOWAT", None)
# Linux copies a listening TCP socket's options (TCP_NODELAY, TCP_NOTSENT_LOWAT) to each socket
# it accepts: set once on the listener, not twice per connection (two system calls). Elsewhere
# each accepted socket gets them (tests/unit/http/test_server.py checks them on an accepted one).
_INHERITS_OPTIONS = sys.platform.startswith("linux")


async def _lingering_close(stream: trio.abc.Stream, seconds: float = 2.0, limit: int = 1 << 20) -> None:
    """Read and discard an unread request body for a moment before closing.

    Closing a socket with unread input makes the kernel send RST, which can destroy the
    error response the client has not read yet (nginx's ``lingering_close`` does the same).
    """
    with trio.move_on_after(seconds):
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            received = 0
            while received < limit:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return
                received += len(data)
        except _SOCKET_ERRORS:
            return


async def open_listeners(addresses: tuple[str, ...], *, reuse_port: bool = False) -> list[trio.SocketListener]:
    """Bind every listen address (a backlog sized for thousands of connections). The server
    accepts from these sockets itself (:meth:`Server._accept_batches`)."""
    listeners: list[trio.SocketListener] = []
    for address in addresses:
        host, port = split_host_port(address)
        raw = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock = trio.socket.from_stdlib_socket(raw)  # the same socket, non-blocking
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind((host, port))
        if _INHERITS_OPTIONS:
            _set_options(raw)  # inherited by every connection accepted from it
        sock.listen(4096)
        listener = trio.SocketListener(sock)
        _LISTENING[listener] = raw
        listeners.append(listener)
    return listeners


def bound_address(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
