"""proxy.relay: the body copied to the client, and the observers on its side.

A real :class:`~proxy.http_server.HTTPConnection` on an in-memory stream, with a real
``h11.Connection(h11.CLIENT)`` reading what the relay wrote; the upstream response is a stand-in
that yields given chunks (and may fail after them).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import h11
import pytest
import trio
from structlog.testing import capture_logs
from trio.testing import memory_stream_pair

from proxy.config import ServerConfig
from proxy.errors import UpstreamProtocolError, UpstreamTimeout
from proxy.http_server import HTTPConnection
from proxy.record import RequestRecord
from proxy.relay import relay

CHUNKS = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]


class Upstream:
    """Stands in for UpstreamResponse: yields ``chunks``, then raises ``fail`` if given."""

    def __init__(self, chunks: list[bytes], fail: Exception | None = None):
        self._chunks, self._fail = chunks, fail
        self.idle_timeout = 30.0

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        for chunk in self._chunks:
            await trio.lowlevel.checkpoint()
            yield chunk
        if self._fail is not None:
            raise self._fail

    def idle_timeout_error(self) -> UpstreamTimeout:
        return UpstreamTimeout("idle")


class Recorder:
    def __init__(self) -> None:
        self.fed: list[bytes] = []
        self.finished: list[bool] = []

    def feed(self, data: bytes) -> None:
        self.fed.append(data)

    def finish(self, complete: bool) -> None:
        self.finished.append(complete)


class Broken(Recorder):
    def feed(self, data: bytes) -> None:
        super().feed(data)
        raise ValueError("observer bug")


async def relay_to_client(
    upstream: Upstream, observers: tuple[Any, ...]
) -> tuple[RequestRecord, bytes, Exception | None]:
    """Relay ``upstream`` to a real h11 client; the record, the body it read, and what relay raised."""
    client_end, server_end = memory_stream_pair()
    conn = HTTPConnection(server_end, ServerConfig(), "127.0.0.1")
    client = h11.Connection(h11.CLIENT)
    await client_end.send_all(client.send(h11.Request(method="GET", target="/", headers=[("host", "x")])))
    await client_end.send_all(client.send(h11.EndOfMessage()))
    assert await conn.next_request(5) is not None
    async for _ in conn.body_chunks():
        pass
    await conn.send_head(200, [(b"content-type", b"text/event-stream")])
    record = RequestRecord(trio.current_time(), 0, 0)
    raised: Exception | None = None
    body = bytearray()

    async def read() -> None:
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                data = await client_end.receive_some()
                client.receive_data(data)
                if not data:
                    return
            elif isinstance(event, h11.Data):
                body.extend(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            try:
                await relay(conn, upstream, record, observers)
            except Exception as exc:
                raised = exc
                conn.abort()
            await server_end.aclose()
    return record, bytes(body), raised


async def test_observers_see_the_body_in_order_then_finish_complete() -> None:
    first, second = Recorder(), Recorder()
    record, body, raised = await relay_to_client(Upstream(CHUNKS), (first, second))
    assert raised is None and record.completed and record.relayed == len(b"".join(CHUNKS))
    assert body == b"".join(CHUNKS)
    for observer in (first, second):
        assert observer.fed == CHUNKS
        assert observer.finished == [True]


async def test_an_observer_that_raises_is_dropped_and_the_relay_goes_on() -> None:
    broken, healthy = Broken(), Recorder()
    with capture_logs() as logs:
        record, body, raised = await relay_to_client(Upstream(CHUNKS), (broken, healthy))
    assert raised is None and body == b"".join(CHUNKS)
    assert broken.fed == CHUNKS[:1] and broken.finished == []  # dropped after its first failure
    assert healthy.fed == CHUNKS and healthy.finished == [True]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["observer_failed"]


async def test_an_upstream_failure_finishes_observers_incomplete() -> None:
    recorder = Recorder()
    failure = UpstreamProtocolError("upstream closed mid-body")
    record, body, raised = await relay_to_client(Upstream(CHUNKS[:2], fail=failure), (recorder,))
    assert raised is failure and not record.completed
    assert body == b"".join(CHUNKS[:2])  # what was written before the failure
    assert recorder.fed == CHUNKS[:2] and recorder.finished == [False]


@pytest.mark.parametrize("observers", [(), (Recorder(),)])
async def test_relay_with_and_without_observers_writes_the_same(observers: tuple[Any, ...]) -> None:
    _record, body, raised = await relay_to_client(Upstream(CHUNKS), observers)
    assert raised is None and body == b"".join(CHUNKS)
