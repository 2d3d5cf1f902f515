"""Upstream answers relayed as RFC 9110/9112 require (issue 18), through Parkway on real sockets.

Each test scripts the upstream's exact bytes (tests/support/scripted.py) and keeps its socket
open unless the case says otherwise, so a relay that waits for more than the answer has
hangs into the ``fail_after`` guard instead of passing by luck. Both relay drivers.
"""

from __future__ import annotations

import pytest
import trio

from support.http import Call, call
from support.parkway import RunningParkway
from support.scripted import ScriptedRequest, ScriptedUpstream, answer_with

pytestmark = pytest.mark.usefixtures("relay_path", "http_parser")
FRESH = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nfresh"
GUARD = 5.0  # far below upstream_idle_timeout: a relay waiting for a body that cannot come fails


@pytest.fixture
async def scripted(nursery: trio.Nursery) -> ScriptedUpstream:
    return await nursery.start(ScriptedUpstream().serve)


async def get(parkway: RunningParkway, url: str, method: str = "GET", **kwargs: object):  # noqa: ANN201
    return await call(parkway.port, method, parkway.sign(url, method=method), timeout=GUARD, **kwargs)


# --- harm 1: an empty body on a kept-alive connection ends at once --------------------------------

EMPTY_KEPT = {
    **{f"{s} length 0": (b"HTTP/1.1 %d X\r\ncontent-length: 0\r\n\r\n" % s, s) for s in (200, 201, 202, 302, 401, 404, 500)},
    "205 length 0": (b"HTTP/1.1 205 Reset Content\r\ncontent-length: 0\r\n\r\n", 205),
    "after 100 Continue": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", 200),
}  # fmt: skip


@pytest.mark.parametrize("case", EMPTY_KEPT)
async def test_an_empty_body_ends_at_once_and_keeps_its_connection(start_parkway, scripted, case):
    answer, status = EMPTY_KEPT[case]
    scripted.answers = [answer_with(answer), answer_with(FRESH)]
    parkway = await start_parkway()

    first = await get(parkway, f"{scripted.base}/v1/a")
    second = await get(parkway, f"{scripted.base}/v1/b")

    assert (first.status, first.body, first.complete) == (status, b"", True)
    assert second.body == b"fresh"
    assert [r.connection for r in scripted.requests] == [1, 1]  # clean: back to the pool


EMPTY_CLOSING = {
    "HTTP/1.0 keep-alive": b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
    "close left open": b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
}


@pytest.mark.parametrize("case", EMPTY_CLOSING)
async def test_an_empty_body_that_ends_the_connection_ends_at_once_and_is_not_reused(start_parkway, scripted, case):
    scripted.answers = [answer_with(EMPTY_CLOSING[case]), answer_with(FRESH)]  # the socket stays open
    parkway = await start_parkway()

    first = await get(parkway, f"{scripted.base}/v1/a")
    second = await get(parkway, f"{scripted.base}/v1/b")

    assert (first.status, first.body, first.complete) == (200, b"", True)
    assert second.body == b"fresh"
    assert [r.connection for r in scripted.requests] == [1, 2]


async def test_an_empty_body_reaches_an_http10_client(start_parkway, scripted):
    scripted.answers = [answer_with(b"HTTP/1.1 302 Found\r\nlocation: /x\r\ncontent-length: 0\r\n\r\n")]
    parkway = await start_parkway()
    url = parkway.sign(f"{scripted.base}/v1/a")
    target = url.split(parkway.base, 1)[1]

    with trio.fail_after(GUARD):
        async with await trio.open_tcp_stream("127.0.0.1", parkway.port) as stream:
            await stream.send_all(f"GET {target} HTTP/1.0\r\nhost: x\r\n\r\n".encode())
            raw = b""
            while data := await stream.receive_some(65536):
                raw += data

    assert raw.startswith(b"HTTP/1.1 302 ") and raw.endswith(b"\r\n\r\n")


async def test_a_head_is_sent_before_its_body_arrives(start_parkway, scripted):
    seen = trio.Event()

    async def paused(req: ScriptedRequest) -> None:
        await req.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        await seen.wait()  # the body comes only once the client has the head
        await req.send(b"hello")

    scripted.answers = [paused]
    parkway = await start_parkway()

    with trio.fail_after(GUARD):
        opened = await Call.open(parkway.port, "GET", parkway.sign(f"{scripted.base}/v1/a"))
        assert await opened.head() == 200
        seen.set()
        reply = await opened.finish()

    assert reply.body == b"hello" and reply.complete


# --- harm 2: an error for a HEAD request is its head, without a body -------------------------------


async def head_twice(port: int, first: str, second: str) -> tuple[bytes, bytes]:
    """Two requests on one connection, the first a HEAD: what came back for each."""
    with trio.fail_after(GUARD):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(f"HEAD {first} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            await stream.send_all(f"GET {second} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
            raw = b""
            while data := await stream.receive_some(65536):
                raw += data
    head, _, rest = raw.partition(b"\r\n\r\n")
    return head, rest


async def test_an_unsigned_head_gets_its_error_head_and_the_connection_lives(start_parkway):
    parkway = await start_parkway()

    head, rest = await head_twice(parkway.port, "/", "/")

    assert head.startswith(b"HTTP/1.1 400 ") and b"content-length: " in head
    assert rest.startswith(b"HTTP/1.1 400 ")  # no body between: the next answer follows the head
    assert rest.endswith(b"}")


async def test_a_head_answered_with_garbage_gets_a_502_head(start_parkway, scripted):
    scripted.answers = [answer_with(b"HELLO THERE\r\n\r\n", close=True)]
    parkway = await start_parkway()

    reply = await get(parkway, f"{scripted.base}/v1/a", method="HEAD")

    assert (reply.status, reply.body, reply.complete) == (502, b"", True)
    assert int(reply.headers["content-length"]) > 0  # GET's length, as RFC 9110 §9.3.2 allows


async def test_a_malformed_head_request_gets_its_error_head(start_parkway):
    parkway = await start_parkway()

    with trio.fail_after(GUARD):
        async with await trio.open_tcp_stream("127.0.0.1", parkway.port) as stream:
            await stream.send_all(
                b"HEAD / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            raw = b""
            while data := await stream.receive_some(65536):
                raw += data

    assert raw.startswith(b"HTTP/1.1 400 ") and raw.endswith(b"\r\n\r\n")


# --- harm 3 and trailers: chunk extensions with bad whitespace, trailers under the header policy ---


async def raw_exchange(port: int, target: str, version: str = "1.1") -> bytes:
    """One request (Connection: close); every byte the server sent until it closed."""
    with trio.fail_after(GUARD):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(f"GET {target} HTTP/{version}\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
            raw = b""
            while data := await stream.receive_some(65536):
                raw += data
    return raw


CHUNKED_BWS = b"5 ;foo=bar\r\nhello\r\n0\r\nx-usage: 3\r\nset-cookie: s=1\r\n\r\n"


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_chunk_extensions_with_bad_whitespace_are_relayed_whole(start_parkway, scripted, version):
    scripted.answers = [answer_with(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + CHUNKED_BWS)]
    parkway = await start_parkway()
    target = parkway.sign(f"{scripted.base}/v1/a").split(parkway.base, 1)[1]

    raw = await raw_exchange(parkway.port, target, version)

    body = raw.partition(b"\r\n\r\n")[2]
    if version == "1.1":  # passed through with a bare size line, minus the cookie trailer
        assert body == b"5\r\nhello\r\n0\r\nx-usage: 3\r\n\r\n"
    else:  # de-framed for an HTTP/1.0 client, whose body ends at the close
        assert body == b"hello"


async def test_a_bare_cr_in_a_chunk_extension_cuts_the_stream(start_parkway, scripted):
    wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n"
    scripted.answers = [answer_with(wire)]
    parkway = await start_parkway()
    target = parkway.sign(f"{scripted.base}/v1/a").split(parkway.base, 1)[1]

    raw = await raw_exchange(parkway.port, target)

    assert b"\r" not in raw.partition(b"\r\n\r\n")[2].replace(b"\r\n", b"")  # never passed on
    assert not raw.endswith(b"0\r\n\r\n")  # cut: the client sees an incomplete body


# --- harm 4: a request that reached the upstream is never sent twice unless that is safe ------------

CLEAN = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"


async def hang_up(req: ScriptedRequest) -> None:
    req.close_after = True  # read the whole request, then close without a word


SIGNED_BODY = '{"model":"m","input":"hi"}'


@pytest.mark.parametrize(
    ("method", "signed", "sent_again"),
    [("POST", True, False), ("POST", False, False), ("PATCH", True, False), ("PUT", True, True), ("PUT", False, False)],
    ids=["POST-signed", "POST-streamed", "PATCH-signed", "PUT-held", "PUT-streamed"],
)
async def test_a_request_the_upstream_read_is_sent_again_only_when_safe(
    start_parkway, scripted, method, signed, sent_again
):
    scripted.answers = [answer_with(CLEAN), hang_up, answer_with(FRESH)]
    parkway = await start_parkway()
    await get(parkway, f"{scripted.base}/v1/warm")  # a kept-alive connection in the pool

    url = parkway.sign(f"{scripted.base}/v1/charge", method=method, body=SIGNED_BODY if signed else None)
    reply = await call(parkway.port, method, url, body=SIGNED_BODY.encode(), timeout=GUARD)

    if sent_again:  # idempotent with its body held whole (RFC 9110 §9.2.2)
        assert reply.body == b"fresh"
        assert [r.connection for r in scripted.requests] == [1, 1, 2]
    else:
        assert reply.status == 502 and reply.code == "upstream_protocol_error"
        assert len(scripted.requests) == 2  # the upstream saw it once


# --- harm 5: an early answer is relayed, the rest of the body is not forwarded ---------------------


class EarlyAnswer:
    """An upstream that answers 413 + Connection: close after reading only the request head, then
    stops reading (``close``: closes its socket at once; else counts what still arrives)."""

    def __init__(self, close: bool):
        self.close = close
        self.port = 0
        self.after_head = -1  # request bytes that arrived after the head, until Parkway closed

    async def serve(self, *, task_status: trio.TaskStatus[EarlyAnswer] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(65536)
        await stream.send_all(
            b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 8\r\n\r\ntoo big!"
        )
        if self.close:
            await trio.aclose_forcefully(stream)
            return
        await trio.sleep(0.5)  # stop reading for a while, as such an upstream does; then count what came
        received = len(buf.partition(b"\r\n\r\n")[2])
        try:
            while data := await stream.receive_some(65536):
                received += len(data)
        except trio.BrokenResourceError:
            pass
        self.after_head = received
        await trio.aclose_forcefully(stream)


@pytest.mark.parametrize("close", [False, True], ids=["keeps-socket", "closes"])
async def test_an_early_answer_reaches_the_client_and_the_body_stops(start_parkway, nursery, close):
    upstream = await nursery.start(EarlyAnswer(close).serve)
    parkway = await start_parkway()
    size = 4 << 20
    target = parkway.sign(f"http://127.0.0.1:{upstream.port}/v1/upload", method="POST").split(parkway.base, 1)[1]

    with trio.fail_after(GUARD):
        stream = await trio.open_tcp_stream("127.0.0.1", parkway.port)
        async with stream, trio.open_nursery() as sending:

            async def send() -> None:
                try:
                    await stream.send_all(
                        f"POST {target} HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n".encode()
                    )
                    await stream.send_all(b"x" * size)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # Parkway stopped reading the body, as RFC 9112 §9.6 lets it

            sending.start_soon(send)
            raw = b""
            while b"too big!" not in raw:
                data = await stream.receive_some(65536)
                assert data, raw
                raw += data
            sending.cancel_scope.cancel()

    assert raw.startswith(b"HTTP/1.1 413 ") and b"connection: close" in raw.lower()
    if not close:
        with trio.fail_after(GUARD):
            while upstream.after_head < 0:
                await trio.sleep(0.05)
        assert upstream.after_head < size  # the rest of the client's body was not forwarded


# --- deviations: 1xx forwarded to HTTP/1.1 clients, the head size limit on every head --------------

HINTS = (
    b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\nset-cookie: s=1\r\n\r\n"
    b"HTTP/1.1 102 Processing\r\n\r\n"
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
)


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_unasked_1xx_reach_http11_clients_only(start_parkway, scripted, version):
    scripted.answers = [answer_with(HINTS)]
    parkway = await start_parkway()
    target = parkway.sign(f"{scripted.base}/v1/a").split(parkway.base, 1)[1]

    raw = await raw_exchange(parkway.port, target, version)

    if version == "1.1":
        hints, processing, final = raw.split(b"\r\n\r\n", 2)
        assert hints.startswith(b"HTTP/1.1 103 ") and b"link: </a.css>; rel=preload" in hints
        assert b"set-cookie" not in hints.lower()  # the response header policy applies
        assert processing.startswith(b"HTTP/1.1 102 ")
        assert final.startswith(b"HTTP/1.1 200 ") and final.endswith(b"ok")
    else:
        assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"ok") and b" 103 " not in raw


@pytest.mark.parametrize(("size", "status"), [(60_000, 200), (70_000, 502), (120_000, 502)])
async def test_the_head_size_limit_holds_however_the_head_arrives(start_parkway, scripted, size, status):
    big = b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * size + b"\r\ncontent-length: 2\r\n\r\nok"
    scripted.answers = [answer_with(big)]  # one write: the end of the head is buffered at once
    parkway = await start_parkway()

    reply = await get(parkway, f"{scripted.base}/v1/a")

    assert reply.status == status


async def test_a_request_body_with_bad_whitespace_before_an_extension_is_refused(start_parkway, scripted):
    # Documented deviation (docs/proxying.md): request bodies are parsed by h11, which refuses it.
    parkway = await start_parkway()
    target = parkway.sign(f"{scripted.base}/v1/a", method="POST").split(parkway.base, 1)[1]

    with trio.fail_after(GUARD):
        async with await trio.open_tcp_stream("127.0.0.1", parkway.port) as stream:
            await stream.send_all(
                f"POST {target} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".encode()
                + b"5 ;a=b\r\nhello\r\n0\r\n\r\n"
            )
            raw = b""
            while data := await stream.receive_some(65536):
                raw += data

    assert raw.startswith(b"HTTP/1.1 400 ") and b"malformed_http" in raw
    assert scripted.requests == []
