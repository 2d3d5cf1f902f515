"""The listening side of the HTTP server: listening sockets, accept loops, one task per
connection, the connection cap and the graceful drain. Each connection is an
:class:`~proxy.http.connection.HTTPConnection` of the configured implementation
(:func:`open_connection`); this module never touches h11 itself.
"""

from __future__ import annotations

import errno
import math
from typing import Protocol

import trio

from ..config import ServerConfig
from ..errors import InternalError, Overloaded, ParkwayError
from ..sweep import FIRED, Sweep, tick_for
from ..urls import split_host_port
from . import parsers
from .connection import _SOCKET_ERRORS, RECEIVE_SIZE, ClientGone, HTTPConnection, RequestHead, log
from .h11_impl import H11Connection

try:
    from .httptools_impl import HttptoolsConnection
except ImportError:  # a bare install: h11 only
    HttptoolsConnection = None  # type: ignore[assignment,misc]

ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class Application(Protocol):
    async def handle(self, head: RequestHead, conn: HTTPConnection) -> None: ...

    async def reject(self, head: RequestHead | None, conn: HTTPConnection, exc: ParkwayError) -> None: ...


def open_connection(stream: trio.abc.Stream, config: ServerConfig, peer: str) -> HTTPConnection:
    """The client connection of the implementation ``config.http`` resolves to (auto: httptools
    when installed, else h11)."""
    if parsers.resolve(config.http) == "httptools" and HttptoolsConnection is not None:
        return HttptoolsConnection(stream, config, peer)
    return H11Connection(stream, config, peer)


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
        for scope in list(self.heads.deadlines):
            scope.cancel()
        if self._connections is not None:
            self._connections.cancel_scope.deadline = trio.current_time() + self.config.drain_timeout

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in ACCEPT_ERRNOS:
                    log.error("accept_failed", error=errno.errorcode.get(exc.errno, str(exc.errno)), retry_in=0.1)
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(self._connection_task, stream)

    async def _connection_task(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()[0]
        except OSError:
            peer = "unknown"
        conn = open_connection(stream, self.config, peer)
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
            with trio.CancelScope(shield=True):
                if not conn.request_complete and conn.response_started and not conn.handed_over:
                    await _lingering_close(stream)
                await trio.aclose_forcefully(stream)

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
        # One scope for the connection's whole life, in the heads' table only while it waits for
        # a head: shutdown cancels it there (a scope per request cost 4-6 µs each), and so does
        # the sweep once the head's deadline, which next_request enters there, has passed (no
        # trio deadline to set and lift per request). A head that arrived as the scope was
        # cancelled (shutdown, or its deadline just then; nothing raised) is answered outside
        # it, as the last on its connection; so is a refused one.
        first = True
        head: RequestHead | None = None
        refusal: ParkwayError | None = None
        # (Served outside serve(), as some tests do, the deadlines are the scope's own.)
        heads = self.heads if self.heads.running else Sweep.on_scopes()
        deadlines = heads.deadlines
        with trio.CancelScope() as idle:
            while not self.draining:
                deadlines[idle] = math.inf
                try:
                    head = await conn.next_request(
                        self.config.header_read_timeout if first else self.config.keepalive_timeout, idle, heads
                    )
                except ParkwayError as exc:  # malformed head, too large
                    refusal = exc
                    break
                finally:
                    fired = deadlines[idle] == FIRED  # the head's deadline passed as it came
                    del deadlines[idle]
                if head is None or self.draining or fired:
                    break
                first = False
                await self.app.handle(head, conn)
                if not conn.reusable():
                    return
                conn.start_next_cycle()
                head = None
        if idle.cancelled_caught and not self.draining:  # the head's deadline: too slow, or idle
            refusal = conn.head_timeout()
        if refusal is not None:
            # Answered outside the scope: shutdown leaves a refusal to the drain.
            if conn.can_respond:
                conn.close_after_response()
                await self.app.reject(None, conn, refusal)
            return
        if head is not None and not idle.cancelled_caught:
            conn.close_after_response()
            await self.app.handle(head, conn)


async def _lingering_close(stream: trio.SocketStream, seconds: float = 2.0, limit: int = 1 << 20) -> None:
    """Read and discard an unread request body for a moment before closing.

    Closing a socket with unread input makes the kernel send RST, which can destroy the
    error response the client has not read yet (nginx's ``lingering_close`` does the same).
    """
    with trio.move_on_after(seconds):
        try:
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
    """Bind every listen address (a backlog sized for thousands of connections)."""
    listeners: list[trio.SocketListener] = []
    for address in addresses:
        host, port = split_host_port(address)
        sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
        await sock.bind((host, port))
        sock.listen(4096)
        listeners.append(trio.SocketListener(sock))
    return listeners


def bound_address(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
