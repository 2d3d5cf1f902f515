"""proxy.relay.pump: the body moved to the client, and the observers on its side.

A real :class:`~proxy.http.connection.HTTPConnection` (both implementations) on an in-memory stream, with a real
``h11.Connection(h11.CLIENT)`` reading what the relay wrote (the portable driver: an in-memory
stream has no socket for the engine); the upstream is a real socket pair whose far end the test
writes a chunked body to (and may close in the middle of it).
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import h11
import pytest
import trio
from structlog.testing import capture_logs
from trio.testing import memory_stream_pair

from proxy.config import ServerConfig
from proxy.errors import UpstreamProtocolError
from proxy.http.chunked import Framing
from proxy.http.server import open_connection
from proxy.record import RequestRecord
from proxy.relay.pump import relay
from proxy.upstream.client import UpstreamResponse
from proxy.upstream.connection import UpstreamConnection

HTTP_IMPL = "h11"  # the client connection's implementation (proxy.http.h11_impl / httptools_impl)


@pytest.fixture(autouse=True, params=["h11", "httptools"])
def http_impl(request, monkeypatch) -> str:
    monkeypatch.setattr(sys.modules[__name__], "HTTP_IMPL", request.param)
    return request.param


CHUNKS = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]


class Upstream:
    """A socket pair: Parkway's end is an upstream connection whose response head was read;
    :meth:`send` writes ``chunks`` (chunk-framed) to the other end, then the terminator, or
    closes the connection after them when ``fail``."""

    def __init__(self, chunks: list[bytes], fail: bool = False):
        self._chunks, self._fail = chunks, fail
        ours, self.theirs = socket.socketpair()
        ours.setblocking(False)
        self.conn = UpstreamConnection(ours, "upstream.test")
        self.conn.http.request("GET", b"/", [(b"host", b"upstream.test")])
        self.conn.http.end()
        head = self.conn.http.read_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        assert head.framing == Framing("chunked")
        self.response = UpstreamResponse(200, head.headers, head.framing, self.conn, b"", 30.0)

    async def send(self) -> None:
        for chunk in self._chunks:
            self.theirs.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await trio.sleep(0.01)  # one event at a time, as a model streams them
        if self._fail:
            self.theirs.close()
        else:
            self.theirs.sendall(b"0\r\n\r\n")

    def close(self) -> None:
        self.conn.close()
        self.theirs.close()


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
    upstream: Upstream, observers: tuple[Any, ...], *, hold_head: bool = False
) -> tuple[RequestRecord, bytes, Exception | None]:
    """Relay ``upstream`` to a real h11 client; the record, the body it read, and what relay raised."""
    client_end, server_end = memory_stream_pair()
    conn = open_connection(server_end, ServerConfig(http=HTTP_IMPL), "127.0.0.1")
    client = h11.Connection(h11.CLIENT)
    await client_end.send_all(client.send(h11.Request(method="GET", target="/", headers=[("host", "x")])))
    await client_end.send_all(client.send(h11.EndOfMessage()))
    assert await conn.next_request(5) is not None
    async for _ in conn.body_chunks():
        pass
    await conn.send_head(200, [(b"content-type", b"text/event-stream")], flush=not hold_head)
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
            nursery.start_soon(upstream.send)
            try:
                await relay(conn, upstream.response, record, observers)
            except Exception as exc:
                raised = exc
                conn.abort()
            await server_end.aclose()
    upstream.close()
    return record, bytes(body), raised


async def test_observers_see_the_body_in_order_then_finish_complete() -> None:
    first, second = Recorder(), Recorder()
    record, body, raised = await relay_to_client(Upstream(CHUNKS), (first, second))
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in CHUNKS) + b"0\r\n\r\n"
    assert raised is None and record.completed and record.relayed == len(framed)  # passed through as framed
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
    record, body, raised = await relay_to_client(Upstream(CHUNKS[:2], fail=True), (recorder,))
    assert isinstance(raised, UpstreamProtocolError) and not record.completed
    assert body == b"".join(CHUNKS[:2])  # what was written before the failure
    assert recorder.fed == CHUNKS[:2] and recorder.finished == [False]


@pytest.mark.parametrize("observers", [(), (Recorder(),)])
async def test_relay_with_and_without_observers_writes_the_same(observers: tuple[Any, ...]) -> None:
    _record, body, raised = await relay_to_client(Upstream(CHUNKS), observers)
    assert raised is None and body == b"".join(CHUNKS)


async def test_a_held_head_goes_out_with_the_first_body_bytes_and_is_not_counted_as_body() -> None:
    record, body, raised = await relay_to_client(Upstream(CHUNKS), (), hold_head=True)
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in CHUNKS) + b"0\r\n\r\n"
    assert raised is None and body == b"".join(CHUNKS)
    assert record.relayed == len(framed)  # the head is not body
