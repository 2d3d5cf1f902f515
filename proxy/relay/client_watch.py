"""The client's side of a request in flight: the request's work is cancelled the moment the
client goes away once its request is complete (while queued, waiting, or streaming).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import trio

from ..errors import ParkwayError
from ..http.connection import ClientGone, HTTPConnection
from ..record import RequestRecord
from .pump import EpollEngine


async def unless_client_leaves(
    engine: EpollEngine | None,
    conn: HTTPConnection,
    record: RequestRecord,
    work: Callable[[], Awaitable[None]],
    scope: trio.CancelScope,
) -> None:
    """Run ``work``, cancelled the moment the client goes away once its request is complete:
    while queued for a slot, waiting for the upstream's first byte, or streaming.

    With the relay engine running, the engine watches the client's socket (one epoll
    registration, and the relay takes it over) and a departure cancels ``scope``, the
    request's own (no scope of its own: each costs 4-7 µs). The caller then finds
    ``scope.cancelled_caught`` with ``record.outcome == "client_gone"`` and aborts the
    connection. Otherwise a watcher task does, and the connection is aborted here.
    """
    fd = conn.fd
    if engine is not None and fd >= 0:
        sock = conn.socket
        if engine.watch_client(fd, partial(client_left, scope, record), sock):
            try:
                await work()
            finally:
                engine.unwatch_client(fd, sock)
            return
    failure: ParkwayError | ClientGone | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_client, conn, nursery.cancel_scope, record)
        try:
            await work()
        except (ParkwayError, ClientGone) as exc:
            # Raised outside the nursery, so callers see the error itself, not a group.
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if record.outcome == "client_gone":
        conn.abort()


async def watch_client(conn: HTTPConnection, scope: trio.CancelScope, record: RequestRecord) -> None:
    # The relay engine stops this watch once it relays the body: it watches the client itself.
    with trio.CancelScope() as record.client_watch:
        await conn.request_done.wait()
        await conn.wait_disconnect()
    if not record.client_watch.cancelled_caught:
        client_left(scope, record)


def client_left(scope: trio.CancelScope, record: RequestRecord) -> None:
    """The client closed its side: the request's work is cancelled, unless the whole answer was read."""
    if record.expected_length is not None and record.relayed >= record.expected_length:
        return  # it read the whole (fixed-length) answer and closed: that is not leaving early
    record.outcome = "client_gone"
    record.error = "client closed the connection before the response was complete"
    scope.cancel()
