"""The relay: an upstream body copied to the client chunk by chunk, each written as it arrives.

Observers (token usage today, a cache recorder later) see the body on the side: each is fed
the bytes once they are written to the client, and told at the end whether the whole body
went through. They cost nothing when there are none, never delay a write, and never raise
into the relay: one that fails is logged and dropped for the rest of the body.
"""

from __future__ import annotations

from contextlib import aclosing, suppress
from typing import Protocol

import structlog
import trio

from .errors import ParkwayError
from .http_server import ClientGone, HTTPConnection
from .record import RequestRecord
from .upstream import UpstreamResponse

log = structlog.get_logger("parkway.relay")


class BodyObserver(Protocol):
    def feed(self, data: bytes) -> None:
        """De-framed body bytes, in order, once written to the client."""

    def finish(self, complete: bool) -> None:
        """Once, at the end: ``complete`` only when the upstream's end of body arrived and
        everything was written to the client."""


async def relay(
    conn: HTTPConnection,
    response: UpstreamResponse,
    record: RequestRecord,
    observers: tuple[BodyObserver, ...] = (),
) -> None:
    """Copy upstream chunks to the client as they arrive, each written at once.

    One cancel scope limits the gaps for the whole copy: a scope per read and per write
    cost as much as the rest of relaying an event. Its deadline is moved only when it
    leaves the range the next wait needs, about once per ``slack`` (at most a second) on a
    steady stream: a silent upstream is cut between ``upstream_idle_timeout`` and that
    plus ``slack`` after its last chunk, and a write gets its own ``client_write_timeout``.
    """
    idle, write_limit = response.idle_timeout, conn.config.client_write_timeout
    slack = min(1.0, idle / 8)
    try:
        async with aclosing(response.chunks()) as chunks:
            with trio.CancelScope(deadline=trio.current_time() + idle + slack) as gap:
                try:
                    async for chunk in chunks:
                        now = trio.current_time()
                        if gap.deadline < now + write_limit + slack:  # the write's own limit fires first
                            gap.deadline = now + write_limit + 2 * slack
                        # Counted before the write: the client may read it and close before we resume.
                        record.relayed += len(chunk)
                        await conn.send_data(chunk)
                        # After the write: observers never delay the client.
                        for observer in observers:
                            try:
                                observer.feed(chunk)
                            except Exception:
                                observers = _drop(observers, observer)
                        now = trio.current_time()
                        if not now + idle <= gap.deadline <= now + idle + slack:  # the next read's limit
                            gap.deadline = now + idle + slack
                except ParkwayError:
                    await send_held(conn)
                    raise
            if gap.cancelled_caught:
                await send_held(conn)
                raise response.idle_timeout_error()
        await conn.send_end()
        record.completed = True
    finally:
        for observer in observers:
            try:
                observer.finish(record.completed)
            except Exception:
                _drop(observers, observer)


async def send_held(conn: HTTPConnection) -> None:
    """The upstream failed before a small answer's body: its held head still goes out, as unheld."""
    with suppress(ClientGone):
        await conn.flush()


def _drop(observers: tuple[BodyObserver, ...], failed: BodyObserver) -> tuple[BodyObserver, ...]:
    """Log an observer's failure; the observers left without it."""
    log.exception("observer_failed", observer=type(failed).__name__)
    return tuple(observer for observer in observers if observer is not failed)
