"""The httptools client connection against h11's, the oracle: the same byte streams give the same
requests, the same bodies, the same refusals and the same bytes on the wire.

Hypothesis writes request streams (valid, malformed, pipelined, Content-Length and chunked
bodies, 100-continue, upgrades, HTTP/1.0) and splits them at random byte boundaries; each
stream is served once by :class:`~proxy.http.h11_impl.H11Connection` and once by
:class:`~proxy.http.httptools_impl.HttptoolsConnection`, through the real server loop, with
an application that reads the body and answers with each response framing (a length, none
(chunked or to the close), 204, a 103 first, HEAD). Everything observable must be equal:
what the application saw, and every byte the client received, until the server closed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from trio.testing import memory_stream_pair, wait_all_tasks_blocked

from proxy.config import ServerConfig
from proxy.errors import ParkwayError, error_response
from proxy.http.connection import HTTPConnection, RequestHead
from proxy.http.server import Server, open_connection

pytest.importorskip("httptools")

CONFIG = dict(
    header_read_timeout=5.0,
    keepalive_timeout=20.0,
    client_body_timeout=3.0,
    client_write_timeout=7.0,
    max_header_bytes=512,
)
BODY_LIMIT = 64


@dataclass
class Recorder:
    """The application: what it saw, in order (heads, bodies, refusals)."""

    seen: list[tuple] = field(default_factory=list)

    async def handle(self, head: RequestHead, conn: HTTPConnection) -> None:
        self.seen.append(("head", head.method, head.target, head.http_version, head.headers, conn.head_only))
        try:
            body = await conn.read_body(BODY_LIMIT)
        except ParkwayError as exc:
            self.seen.append(("body refused", exc.status, exc.code, exc.message))
            status, headers, payload = error_response(exc, head_only=conn.head_only)
            await conn.send_full(status, headers, payload)
            return
        self.seen.append(("body", body, conn.request_complete))
        path = "/refuse" if head.method == "CONNECT" else head.path  # a 2xx to CONNECT would switch protocols
        payload = b"" if conn.head_only else b"%d:%s" % (len(body), body[:8])
        if path == "/chunk":  # no length: chunked to an HTTP/1.1 client, to the close otherwise
            await conn.send_head(200, [(b"content-type", b"text/plain")])
            await conn.send_data(payload)
            await conn.send_data(b"!" if payload else b"")
            await conn.send_end()
        elif path == "/empty":
            await conn.send_full(204, [(b"x-a", b"1")], b"")
        elif path == "/info":
            await conn.send_informational(103, [(b"link", b"</a>; rel=preload")])
            await conn.send_full(200, [(b"content-length", str(len(payload)).encode())], payload)
        elif path == "/refuse":
            await conn.send_full(405, [(b"content-length", b"2")], b"no")
        elif path == "/close":
            await conn.send_full(
                200, [(b"content-length", str(len(payload)).encode()), (b"connection", b"close")], payload
            )
        else:
            await conn.send_full(200, [(b"content-length", str(len(payload)).encode())], payload)
        self.seen.append(("answered", conn.reusable()))

    async def reject(self, head: RequestHead | None, conn: HTTPConnection, exc: ParkwayError) -> None:
        self.seen.append(("refused", exc.status, exc.code, exc.message, head is None))
        status, headers, payload = error_response(exc, head_only=conn.head_only)
        await conn.send_full(status, headers, payload)


class FakeSocket:
    def getpeername(self) -> tuple[str, int]:
        return ("203.0.113.7", 40000)


class PeerStream(trio.abc.HalfCloseableStream):
    """The server's end of an in-memory connection, dressed as a SocketStream (``.socket``)."""

    def __init__(self, inner: trio.abc.HalfCloseableStream):
        self.inner = inner
        self.socket = FakeSocket()

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def serve(impl: str, reads: list[bytes], close: bool) -> tuple[list[tuple], bytes, str]:
    """Serve ``reads`` (each delivered once the server has taken the last) on ``impl``."""
    config = ServerConfig(http=impl, **CONFIG)  # type: ignore[arg-type]
    app = Recorder()
    server = Server(config, app)
    client, server_end = memory_stream_pair()
    received = bytearray()

    async def read_all() -> None:
        while data := await client.receive_some():
            received.extend(data)

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            stream = PeerStream(server_end)
            assert open_connection(stream, config, "203.0.113.7").parser == impl
            # The server's own connection task, as the accept loop starts it (refusals, lingering close).
            nursery.start_soon(server._connection_task, stream)
            for data in reads:
                await wait_all_tasks_blocked()
                try:
                    await client.send_all(data)
                except trio.BrokenResourceError:
                    break
            await wait_all_tasks_blocked()
            if close:
                try:
                    await client.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
    return app.seen, bytes(received), impl


# --- the streams ----------------------------------------------------------------------------

EOL = st.sampled_from([b"\r\n"] * 9 + [b"\n"])


def pick(draw, good: list, bad: list, valid: bool):  # type: ignore[no-untyped-def]
    """One of ``good``, or (when not ``valid``) sometimes one of ``bad``."""
    return draw(st.sampled_from(good if valid else good + bad))


@st.composite
def chunked_body(draw, valid: bool) -> tuple[bytes, bytes]:
    """(wire bytes, de-framed body); malformed only when not ``valid``."""
    wire, body = b"", b""
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.binary(min_size=1, max_size=12))
        size = pick(draw, ["%x", "%X", "0%x", "%x;a=b"], ["%x ", " %x", "%x; a", "%x;\x01", "0x%x"], valid) % len(data)
        end = pick(draw, [b"\r\n"], [b"\n", b"", b"x\r\n"], valid)
        wire += size.encode() + b"\r\n" + data + end
        body += data
    wire += pick(draw, [b"0", b"00"], [b"0;x", b"0 "], valid) + b"\r\n"
    wire += pick(draw, [b"", b"X-T: 1\r\n"], [b"X-T: 1\n", b"Bad Trailer\r\n", b" folded\r\n"], valid)
    wire += pick(draw, [b"\r\n"], [b"\n", b""], valid)
    return wire, body


@st.composite
def request(draw) -> bytes:
    valid = draw(st.integers(0, 9)) < 7  # most streams are well formed; the rest may break anywhere
    method = pick(draw, [b"GET", b"POST", b"HEAD", b"PUT"], [b"CONNECT", b"FOO", b"G@T", b"get"], valid)
    targets = [b"/", b"/chunk", b"/empty", b"/info", b"/close", b"/a?x=%20"]
    target = pick(draw, targets, [b"*", b"/\x80", b"/a b"], valid)
    version = pick(draw, [b"HTTP/1.1"] * 4 + [b"HTTP/1.0"], [b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b""], valid)
    eol = pick(draw, [b"\r\n"], [b"\n"], valid)
    line = method + b" " + target + (b" " + version if version else b"")
    headers: list[bytes] = []
    hosts = pick(draw, [1], [0, 2], valid)
    headers += [b"Host: parkway.test"] * hosts
    kind = draw(st.sampled_from(["none", "length", "length", "chunked"]))
    body = draw(st.binary(max_size=20)) if kind == "length" else b""
    wire_body = b""
    if kind == "length":
        declared = pick(draw, ["%d", "%d, %d", "0%d"], ["%d,%d", "x%d", "%d ", "-%d"], valid)
        headers.append(b"Content-Length: " + (declared.replace("%d", str(len(body)))).encode())
        if not valid and draw(st.booleans()):
            headers.append(b"Content-Length: " + str(len(body) + 1).encode())
        cut = pick(draw, [None], [0, 1], valid)
        wire_body = body if cut is None else body[: len(body) * cut // 2]
        wire_body += pick(draw, [b""], [b"extra"], valid)
    elif kind == "chunked":
        coding = pick(draw, [b"chunked", b"Chunked"], [b"gzip", b"gzip, chunked", b"chunked, chunked"], valid)
        headers.append(b"Transfer-Encoding: " + coding)
        if not valid and draw(st.booleans()):
            headers.append(b"Content-Length: 3")
        wire_body, _ = draw(chunked_body(valid))
    good = [
        b"Connection: close",
        b"Connection: keep-alive",
        b"Connection: Upgrade, Keep-Alive",
        b"Upgrade: websocket",
        b"Expect: 100-continue",
        b"Expect: 100-Continue, foo",
        b"X-Empty:",
        b"X-Sp:   padded   ",
        b"X-Tab:\tx",
        b"X-Obs: caf\xe9",
    ]
    bad = [b"X-Ctl: a\x01b", b"X-Del: a\x7fb", b" folded", b"No-Colon", b"Bad Name: x", b"X-Long: " + b"v" * 300]
    headers += draw(st.lists(st.sampled_from(good if valid else good + bad), max_size=4))
    prefix = pick(draw, [b""], [b"\r\n", b"\n", b" ", b"\x16\x03"], valid)
    return prefix + eol.join([line, *headers]) + eol + eol + wire_body


@st.composite
def stream(draw) -> tuple[list[bytes], bool]:
    data = b"".join(draw(st.lists(request(), min_size=1, max_size=3)))
    data += draw(st.sampled_from([b""] * 6 + [b"GET / HTTP/1.1\r\nHo", b"\r\n", b"junk"]))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    reads = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [r for r in reads if r], draw(st.booleans())


@settings(
    max_examples=int(os.environ.get("EQUIVALENCE_EXAMPLES", "250")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream())
def test_httptools_answers_every_byte_stream_as_h11_does(case: tuple[list[bytes], bool]) -> None:
    reads, close = case
    results = {}
    for impl in ("h11", "httptools"):
        results[impl] = trio.run(serve, impl, reads, close, clock=trio.testing.MockClock(autojump_threshold=0))
    h11_seen, h11_wire, _ = results["h11"]
    fast_seen, fast_wire, _ = results["httptools"]
    for step in h11_seen:
        event(f"{step[0]} {step[1] if step[0] == 'refused' else ''}")
    event(f"{len([s for s in h11_seen if s[0] == 'answered'])} answered")
    assert fast_seen == h11_seen
    assert fast_wire == h11_wire
