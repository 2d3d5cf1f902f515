"""The relay: an upstream body moved to the client socket as it arrives, on one of two drivers.

What each read becomes is :class:`~proxy.relay.stream.RelayStream`'s decision: an upstream's
``chunked`` framing passes through unchanged to an HTTP/1.1 client (a pure scanner finds the
end, refuses broken framing and de-frames for the observers), and every other case goes
through h11 on both sides. Who waits for the sockets is the driver's:
:class:`~proxy.relay.engine.EpollEngine`, one task of the app's nursery relaying every ready
socket per wake-up (Linux), or :func:`~proxy.relay.engine.relay_portable` in the request's own
task (elsewhere, and for streams on in-memory connections).

Observers (token usage today, a cache recorder later) see the body on the side: each is fed
the de-framed bytes once they are written to the client, and told at the end whether the
whole body went through. They cost nothing when there are none, never delay a write, and
never raise into the relay: one that fails is logged and dropped for the rest of the body.
"""

from __future__ import annotations

from contextlib import suppress

import trio

from ..errors import ParkwayError
from ..http.connection import ClientGone, HTTPConnection
from ..record import RequestRecord
from ..upstream.client import UpstreamResponse
from .engine import EpollEngine, relay_portable
from .stream import DONE, BodyObserver, BodyRewrite, RelayStream

__all__ = ["BodyObserver", "BodyRewrite", "EpollEngine", "relay", "send_held"]


async def relay(
    conn: HTTPConnection,
    response: UpstreamResponse,
    record: RequestRecord,
    observers: tuple[BodyObserver, ...] = (),
    *,
    engine: EpollEngine | None = None,
    watcher: trio.CancelScope | None = None,
    rewrite: BodyRewrite | None = None,
) -> None:
    """Relay ``response``'s body to ``conn`` after its head was sent; observers on the side.

    With a running ``engine`` (and a real client socket) the engine relays it and watches the
    client itself, so ``watcher`` (the task waiting for the client to leave) is stopped first.
    A silent upstream is cut after ``upstream_idle_timeout``, a client that does not take a
    write after ``client_write_timeout``; when the body ends cleanly with nothing after it, the
    upstream connection is marked reusable.
    """
    stream = RelayStream(conn, response.conn, response.framing, idle_timeout=response.idle_timeout,
                         observers=observers, rewrite=rewrite)  # fmt: skip
    try:
        if engine is not None and engine.running and stream.client_fd >= 0:
            if watcher is not None:
                watcher.cancel()
            # engine.relay's first step here: a body that came whole with the head (a small answer)
            # ends without the engine's coroutine.
            state = stream.start(response.initial)
            if state == DONE:
                stream.finish_observers()
            else:
                await engine.follow(stream, state)
        else:
            await relay_portable(stream, response.initial)
    except ParkwayError:
        await send_held(conn)
        raise
    finally:
        record.relayed = stream.relayed
    response.reusable = stream.reusable
    record.completed = True


async def send_held(conn: HTTPConnection) -> None:
    """The upstream failed before a small answer's body: its held head still goes out, as unheld."""
    with suppress(ClientGone):
        await conn.flush()
