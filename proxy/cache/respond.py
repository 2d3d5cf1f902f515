"""Answers that make no upstream call: a stored entry replayed, or an identical request followed.

The counterpart of :mod:`proxy.relay.pump` for the cache: the status and headers first (the stored or
the leader's, with this request's own CORS, request id and ``Cache-Status``), then the body as the
same sequence of chunks, one write each, so a streamed answer still arrives token by token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import trio

from .. import forwarding
from ..http.connection import HTTPConnection
from ..record import RequestRecord
from .entry import CacheEntry, Recording
from .flight import Flight, follow, replay
from .policy import content_length

Headers = Sequence[tuple[bytes, bytes]]


async def send_stored(
    conn: HTTPConnection, entry: CacheEntry, headers: Headers, record: RequestRecord, *, paced: bool
) -> None:
    """Replay ``entry`` with ``headers`` (already made from it by the caller)."""
    await _send_head(conn, entry.status, headers, record)

    async def send(chunk: bytes) -> None:
        record.relayed += len(chunk)
        await conn.send_data(chunk)

    await replay(entry, send, paced=paced)
    await conn.send_end()
    record.completed = True


async def send_followed(
    conn: HTTPConnection,
    flight: Flight,
    head: Recording,
    headers: Headers,
    record: RequestRecord,
    before_end: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Send the answer ``flight``'s leader is receiving, as it arrives. Raises
    :class:`~proxy.cache.flight.LeaderFailed` or :class:`~proxy.cache.flight.FellBehind` mid-body."""
    await _send_head(conn, head.status, headers, record)

    async def send(chunk: bytes) -> None:
        record.relayed += len(chunk)
        await conn.send_data(chunk)

    await follow(flight, send)
    if before_end is not None:
        await before_end()
    await conn.send_end()
    record.completed = True


async def _send_head(conn: HTTPConnection, status: int, headers: Headers, record: RequestRecord) -> None:
    out = list(headers)
    length = next((v for n, v in out if n == b"content-length"), None)
    record.status = status
    record.expected_length = content_length(length)
    if forwarding.is_event_stream(out):
        out.append((b"x-accel-buffering", b"no"))
    # A small fixed-length answer goes out as one write, head and body together.
    await conn.send_head(status, out, flush=record.expected_length is None)
    record.head_sent_at = trio.current_time()
