"""proxy.relay.stream without a driver: the upstream's reads fed by hand, split where a test
likes, and what the relay would write read back by a real ``h11.Connection(h11.CLIENT)``.

The client is an in-memory stream (no socket), so every write is handed back as ``pending``:
what each read of the upstream becomes on the client's connection is visible byte for byte.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator

import h11
import pytest
import trio
from trio.testing import memory_stream_pair

from proxy.config import ServerConfig
from proxy.http.chunked import Framing, MalformedChunks
from proxy.http.server import open_connection
from proxy.relay.stream import BLOCKED, RelayStream
from proxy.upstream.connection import UpstreamConnection

HTTP_IMPL = "h11"  # the client connection's implementation (proxy.http.h11_impl / httptools_impl)


@pytest.fixture(autouse=True, params=["h11", "httptools"])
def http_impl(request, monkeypatch) -> str:
    """Every relay here writes to a client connection of both implementations."""
    monkeypatch.setattr(sys.modules[__name__], "HTTP_IMPL", request.param)
    return request.param


@pytest.fixture(params=["h11", "httptools"])
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[UpstreamConnection]:
    """An upstream connection whose chunked response head was read (the socket is never used),
    on each HTTP/1.1 implementation."""
    ours, theirs = socket.socketpair()
    conn = UpstreamConnection(ours, "upstream.test", parser=request.param)
    read_head(conn, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    yield conn
    conn.close()
    theirs.close()


def read_head(conn: UpstreamConnection, head: bytes) -> None:
    conn.http.request("GET", b"/", [(b"host", b"upstream.test")])
    conn.http.end()
    conn.http.read_head(head)


async def relayed(upstream: UpstreamConnection, reads: list[bytes], http_version: str = "1.1") -> tuple[bytes, list]:
    """Feed ``reads`` to a relay of a chunked answer; the bytes written and the client's h11 events."""
    client_end, server_end = memory_stream_pair()
    conn = open_connection(server_end, ServerConfig(http=HTTP_IMPL), "127.0.0.1")
    await client_end.send_all(f"GET / HTTP/{http_version}\r\nhost: x\r\n\r\n".encode())
    assert await conn.next_request(5) is not None
    async for _ in conn.body_chunks():
        pass
    await conn.send_head(200, [], flush=False)
    stream = RelayStream(conn, upstream, Framing("chunked"), idle_timeout=30.0)
    written = b""
    for data in reads:
        if stream.on_upstream(data) == BLOCKED:
            written += bytes(stream.pending or b"")
            stream.sent_all()
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(written)
    if not stream.complete or http_version == "1.0":
        client.receive_data(b"")
    events = []
    try:
        while (event := client.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
            events.append(event)
            if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    except h11.RemoteProtocolError:  # what an h11 client could not read: the test's failure
        events.append(None)
    return written, events


def body_of(events: list) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data))


WIRE = b'5 ;foo=bar\r\nhello\r\n6\t; x = "y"\r\n world\r\n0 ;end\r\nx-usage: 7\r\nset-cookie: s=1\r\n\r\n'


@pytest.mark.parametrize("cut", range(0, len(WIRE), 3))
async def test_extensions_are_dropped_and_trailers_filtered_however_the_body_is_cut(upstream, cut) -> None:
    written, events = await relayed(upstream, [WIRE[:cut], WIRE[cut:]] if cut else [WIRE])
    # Bare hex sizes (an h11 client, like httpx's, refuses the whitespace), the cookie gone.
    assert written.partition(b"\r\n\r\n")[2] == b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-usage: 7\r\n\r\n"
    assert body_of(events) == b"hello world"
    assert list(events[-1].headers) == [(b"x-usage", b"7")]


async def test_trailers_of_hop_by_hop_and_framing_fields_are_dropped(upstream) -> None:
    wire = b"2\r\nok\r\n0\r\nconnection: close\r\ncontent-length: 9\r\nx-keep: 1\r\nkeep-alive: 5\r\ntrailer: x\r\n\r\n"
    _written, events = await relayed(upstream, [wire[:9], wire[9:20], wire[20:]])
    assert body_of(events) == b"ok" and list(events[-1].headers) == [(b"x-keep", b"1")]


async def test_a_chunked_body_with_bad_whitespace_reaches_an_http10_client_whole(upstream) -> None:
    written, _events = await relayed(upstream, [WIRE], http_version="1.0")
    assert written.endswith(b"hello world")


async def test_a_bare_cr_in_an_extension_cuts_the_stream(upstream) -> None:
    with pytest.raises(MalformedChunks):
        await relayed(upstream, [b"5;a\rb\r\nhello\r\n0\r\n\r\n"])


async def test_a_bodiless_answer_ends_at_start(upstream) -> None:
    # Content-Length: 0 ends without awaiting the upstream (issue 18, harm 1).
    client_end, server_end = memory_stream_pair()
    conn = open_connection(server_end, ServerConfig(http=HTTP_IMPL), "127.0.0.1")
    await client_end.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert await conn.next_request(5) is not None
    async for _ in conn.body_chunks():
        pass
    await conn.send_head(200, [(b"content-length", b"0")], flush=False)
    upstream.http = type(upstream.http)()  # a fresh exchange on the same implementation
    read_head(upstream, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    stream = RelayStream(conn, upstream, Framing("length", 0), idle_timeout=30.0)
    with trio.fail_after(1):
        assert stream.start(b"") == BLOCKED  # the held head, written at once
    assert stream.complete and stream.reusable
    assert bytes(stream.pending or b"").startswith(b"HTTP/1.1 200 ")
