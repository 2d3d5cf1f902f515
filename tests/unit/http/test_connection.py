"""proxy.http.connection edge cases, without real sockets.

The server runs on in-memory streams (``trio.testing.memory_stream_pair``; the lockstep pair
where a client that does not read must block the server's writes) with a real
``h11.Connection(h11.CLIENT)`` as the peer, as in hypercorn's ``tests/trio/test_keep_alive.py``.
Every test takes ``autojump_clock``, so timeouts of seconds run instantly and each expected
instant is checked exactly; a ``fail_after`` guard in virtual time turns a hang into a failure.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import pytest
import trio
from trio.testing import lockstep_stream_pair, memory_stream_pair, wait_all_tasks_blocked

from proxy.config import ServerConfig
from proxy.errors import (
    BadRequest,
    BodyTooLarge,
    HeadersTooLarge,
    Overloaded,
    ParkwayError,
    RequestTimeout,
    error_response,
)
from proxy.http.connection import ClientGone, HTTPConnection, RequestHead
from proxy.http.server import Server, open_connection
from proxy.sweep import Sweep, tick_for
from proxy.urls import split_host_port
from support.http import parse_response, read_until_eof

PEER = "203.0.113.7"
GUARD = 600  # virtual seconds: far beyond every timeout below, so only a hang reaches it

# Distinct values, so a test can tell which timeout fired from the instant it fired at.
TIMEOUTS = dict(
    header_read_timeout=5.0,
    keepalive_timeout=20.0,
    client_body_timeout=3.0,
    client_write_timeout=7.0,
    drain_timeout=30.0,
    max_header_bytes=1024,
)


@pytest.fixture(autouse=True, params=["h11", "httptools"])
def http_parser(request, monkeypatch) -> str:
    """Every test here runs with both request-head parsers (proxy.http.parsers)."""
    monkeypatch.setitem(TIMEOUTS, "http", request.param)
    return request.param


# --- the fake application -----------------------------------------------------------------

Handler = Callable[[RequestHead, HTTPConnection], Awaitable[None]]


async def send_error(conn: HTTPConnection, exc: ParkwayError) -> None:
    """Answer ``exc`` the way the real gateway does: one response from ``error_response``."""
    status, headers, body = error_response(exc)
    await conn.send_full(status, headers, body)


async def echo_body(head: RequestHead, conn: HTTPConnection) -> None:
    """Read the whole body (bounded), answer 200 with the path and the body."""
    try:
        body = await conn.read_body(1 << 20)
    except ParkwayError as exc:
        await send_error(conn, exc)
        return
    payload = head.path.encode() + b" " + body
    await conn.send_full(200, [(b"content-length", str(len(payload)).encode())], payload)


async def refuse_unread(head: RequestHead, conn: HTTPConnection) -> None:
    """Refuse at once, without touching the body (what the gateway does for a bad signature)."""
    body = b'{"error":"no"}'
    await conn.send_full(403, [(b"content-length", str(len(body)).encode())], body)


@dataclass
class FakeApp:
    """Records what the server hands to the application."""

    handler: Handler = echo_body
    heads: list[RequestHead] = field(default_factory=list)
    rejected: list[tuple[RequestHead | None, ParkwayError]] = field(default_factory=list)
    entered: trio.Event = field(default_factory=trio.Event)

    async def handle(self, head: RequestHead, conn: HTTPConnection) -> None:
        self.heads.append(head)
        self.entered.set()
        await self.handler(head, conn)

    async def reject(self, head: RequestHead | None, conn: HTTPConnection, exc: ParkwayError) -> None:
        self.rejected.append((head, exc))
        await send_error(conn, exc)


# --- the in-memory network ----------------------------------------------------------------


class FakeSocket:
    def __init__(self, peer: str):
        self.peer = peer

    def getpeername(self) -> tuple[str, int]:
        return (self.peer, 40000)


class PeerStream(trio.abc.HalfCloseableStream):
    """The server's end of an in-memory connection, dressed as a SocketStream (``.socket``)."""

    def __init__(self, inner: trio.abc.HalfCloseableStream, peer: str):
        self.inner = inner
        self.socket = FakeSocket(peer)
        self.reads = 0  # receive_some calls that returned data
        self.closed = trio.Event()

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if data:
            self.reads += 1
        return data

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        self.closed.set()
        await self.inner.aclose()


class Client:
    """The peer: a real h11 client over the other end of the stream."""

    def __init__(self, stream: trio.abc.HalfCloseableStream):
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    def encode(self, *events) -> bytes:
        return b"".join(self.h11.send(event) or b"" for event in events)

    async def send(self, *events) -> None:
        await self.stream.send_all(self.encode(*events))

    async def request(self, method: str = "GET", target: str = "/", headers=(), body: bytes | None = None) -> None:
        headers = [("Host", "parkway.test"), *headers]
        if body is not None:
            headers.append(("Content-Length", str(len(body))))
        events = [h11.Request(method=method, target=target, headers=headers)]
        if body:
            events.append(h11.Data(data=body))
        await self.send(*events, h11.EndOfMessage())

    async def next_event(self):
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            self.h11.receive_data(await self.stream.receive_some())
        return event

    async def response(self) -> tuple[h11.Response, bytes]:
        response = await self.next_event()
        assert isinstance(response, h11.Response), response
        body = bytearray()
        while isinstance(event := await self.next_event(), h11.Data):
            body += event.data
        assert isinstance(event, h11.EndOfMessage), event
        return response, bytes(body)

    async def assert_closed(self) -> None:
        """The server sent nothing more and closed its side."""
        assert self.h11.trailing_data == (b"", False)
        assert await self.stream.receive_some() == b""

    def reuse(self) -> None:
        self.h11.start_next_cycle()


def header(response: h11.Response, name: bytes) -> list[bytes]:
    return [v for n, v in response.headers if n == name]


def error_of(body: bytes) -> dict:
    return json.loads(body)["error"]


class MemoryListener(trio.abc.Listener[PeerStream]):
    """Hands the server the far ends of in-memory connections made by :meth:`connect`."""

    def __init__(self):
        self._send, self._receive = trio.open_memory_channel[PeerStream](math.inf)

    async def accept(self) -> PeerStream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        await self._receive.aclose()

    def connect(self, *, lockstep: bool = False) -> tuple[Client, PeerStream]:
        client_end, server_end = lockstep_stream_pair() if lockstep else memory_stream_pair()
        stream = PeerStream(server_end, PEER)
        self._send.send_nowait(stream)
        return Client(client_end), stream


@dataclass
class Running:
    server: Server
    listener: MemoryListener
    stopped: trio.Event


@asynccontextmanager
async def serving(app: FakeApp, **overrides) -> AsyncIterator[Running]:
    """``Server.serve`` on a memory listener; shut down (and drained) when the block ends."""
    server = Server(ServerConfig(**{**TIMEOUTS, **overrides}), app)
    listener = MemoryListener()
    stopped = trio.Event()

    async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
        await server.serve([listener], task_status=task_status)
        stopped.set()

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            yield Running(server, listener, stopped)
            server.shutdown()


# --- parsing the request head --------------------------------------------------------------


async def test_head_split_over_many_small_writes_is_parsed(autojump_clock):
    app = FakeApp()
    async with serving(app) as run:
        client, stream = run.listener.connect(lockstep=True)  # each write is one server read
        raw = client.encode(
            h11.Request(
                method="POST",
                target="/v1/chat?X-Sw-Date=20261120T120000Z&q=a%20b",
                headers=[
                    ("Host", "parkway.test"),
                    ("X-Multi", "one"),
                    ("Content-Length", "0"),
                    ("x-multi", "two"),
                    ("X-Latin", b"caf\xe9"),
                ],
            ),
            h11.EndOfMessage(),
        )
        for i in range(0, len(raw), 3):
            await client.stream.send_all(raw[i : i + 3])
        response, body = await client.response()

    assert stream.reads >= len(raw) // 3
    assert response.status_code == 200 and body == b"/v1/chat "
    [head] = app.heads
    assert head.method == "POST"
    assert head.target == "/v1/chat?X-Sw-Date=20261120T120000Z&q=a%20b"
    assert head.path == "/v1/chat"
    assert head.query == "X-Sw-Date=20261120T120000Z&q=a%20b"
    assert head.http_version == "1.1"
    assert head.peer == PEER
    assert head.headers == (
        (b"host", b"parkway.test"),
        (b"x-multi", b"one"),
        (b"content-length", b"0"),
        (b"x-multi", b"two"),
        (b"x-latin", b"caf\xe9"),
    )
    assert head.header(b"x-multi") == "one, two"
    assert head.header(b"x-latin") == "caf\u00e9"
    assert head.header(b"origin") is None


async def test_head_trickling_in_past_header_read_timeout_gets_408_then_close(autojump_clock):
    app = FakeApp()
    async with serving(app) as run:
        client, stream = run.listener.connect()

        async def trickle() -> None:
            # Each piece comes well within the timeout; the head as a whole never completes.
            try:
                await client.stream.send_all(b"GET / HTTP/1.1\r\nHost: parkway.test\r\n")
                while True:
                    await trio.sleep(0.7)
                    await client.stream.send_all(b"X-Slow: a\r\n")
            except trio.BrokenResourceError:  # the server closed the connection
                pass

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            raw = await read_until_eof(client.stream)
            answered = trio.current_time()
            await stream.closed.wait()

    assert fired_within_a_tick(answered - started, 5.0)
    reply = parse_response(raw)
    assert reply.closed
    assert reply.status == 408
    assert error_of(reply.body)["code"] == "client_timeout"
    assert b"close" in reply.values("connection")
    assert app.heads == []
    [(head, exc)] = app.rejected
    assert head is None and isinstance(exc, RequestTimeout)


async def test_connection_silent_for_header_read_timeout_is_closed_without_response(autojump_clock):
    app = FakeApp()
    async with serving(app) as run:
        client, stream = run.listener.connect()
        started = trio.current_time()
        assert await read_until_eof(client.stream) == b""
        assert fired_within_a_tick(trio.current_time() - started, 5.0)
        assert stream.closed.is_set()
    assert app.heads == [] and app.rejected == []


# --- keep-alive --------------------------------------------------------------------------


async def test_second_request_on_a_kept_alive_connection_is_served(autojump_clock):
    app = FakeApp()
    async with serving(app) as run:
        client, _ = run.listener.connect()
        await client.request(target="/one")
        first, first_body = await client.response()
        client.reuse()
        # Idle longer than header_read_timeout (5 s) but within keepalive_timeout (20 s).
        await trio.sleep(15)
        await client.request("POST", "/two", body=b"payload")
        second, second_body = await client.response()

    assert (first.status_code, first_body) == (200, b"/one ")
    assert (second.status_code, second_body) == (200, b"/two payload")
    assert header(first, b"connection") == [] and header(second, b"connection") == []
    assert [h.path for h in app.heads] == ["/one", "/two"]


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /lf HTTP/1.1\nhost: x\ncontent-length: 3\n\nabc",  # bare LF line ends
        b"POST /fold HTTP/1.1\r\nhost: x\r\nx-a: one\r\n two\r\ncontent-length: 3\r\n\r\nabc",  # obs-fold
    ],
    ids=["bare-lf", "obs-fold"],
)
async def test_a_head_llhttp_refuses_is_read_as_h11_reads_it(autojump_clock, raw):
    """llhttp is stricter than h11 here; h11, the reference, decides, so both parsers answer alike."""
    app = FakeApp()
    async with serving(app) as run:
        client, _ = run.listener.connect()
        # The client's h11 is told of an equivalent request; the raw bytes are what is sent.
        target = raw.split(b" ", 2)[1]
        client.encode(h11.Request(method="POST", target=target, headers=[("host", "x"), ("content-length", "3")]))
        client.encode(h11.Data(data=b"abc"), h11.EndOfMessage())
        await client.stream.send_all(raw)
        response, body = await client.response()

    assert (response.status_code, body) == (200, raw.split(b" ", 2)[1] + b" abc")
    assert [h.header(b"x-a") for h in app.heads] == [None if b"x-a" not in raw else "one two"]


async def test_idle_past_keepalive_timeout_is_closed_silently(autojump_clock):
    app = FakeApp()
    async with serving(app) as run:
        client, stream = run.listener.connect()
        await client.request()
        await client.response()
        done = trio.current_time()
        await client.assert_closed()
        assert fired_within_a_tick(trio.current_time() - done, 20.0)
        assert stream.closed.is_set()
    assert len(app.heads) == 1 and app.rejected == []


def fired_within_a_tick(elapsed: float, limit: float, *limits: float) -> bool:
    """A head's timeouts are the server's sweep (proxy.sweep): enforced within a tick after they
    pass, never before (the tick from the server's two limits, TIMEOUTS unless given)."""
    tick = tick_for(*(limits or (TIMEOUTS["header_read_timeout"], TIMEOUTS["keepalive_timeout"])))
    return limit <= elapsed <= limit + tick


async def test_a_kept_alive_connection_waits_for_its_next_head_with_no_trio_deadline(autojump_clock):
    """The idle limit is an entry in the server's sweep, not a deadline set (and lifted) on the
    connection's scope for every request."""
    app = FakeApp()
    async with serving(app) as run:
        client, _ = run.listener.connect()
        await client.request()
        await client.response()
        done = trio.current_time()
        await trio.sleep(1.0)
        [(scope, deadline)] = run.server.heads.deadlines.items()
        assert scope.deadline == math.inf
        assert done <= deadline - 20.0 <= done + 1.0
        client.reuse()
        await client.request(target="/two")
        assert (await client.response())[0].status_code == 200
        await trio.sleep(1.0)
        [(same, later)] = run.server.heads.deadlines.items()
        assert same is scope and later > deadline and scope.deadline == math.inf
    assert [h.path for h in app.heads] == ["/", "/two"]


@pytest.mark.parametrize("which", ["header_read_timeout", "keepalive_timeout"])
async def test_a_limit_shorter_than_the_default_tick_fires_within_its_own_tick(autojump_clock, which):
    """The sweep's tick follows the shortest limit (an eighth of it): 50 ms is not enforced a second late."""
    limits = {**{k: TIMEOUTS[k] for k in ("header_read_timeout", "keepalive_timeout")}, which: 0.05}
    app = FakeApp()
    async with serving(app, **limits) as run:
        client, stream = run.listener.connect()
        if which == "keepalive_timeout":  # an answer, then silence: a silent close
            await client.request()
            await client.response()
            started = trio.current_time()
            await client.assert_closed()
        else:  # a head begun, never finished: 408, then close
            await client.stream.send_all(b"GET / HTTP/1.1\r\n")
            started = trio.current_time()
            reply = parse_response(await read_until_eof(client.stream))
            assert reply.status == 408 and error_of(reply.body)["code"] == "client_timeout"
        assert fired_within_a_tick(trio.current_time() - started, 0.05, *limits.values())
        await stream.closed.wait()
    if which == "header_read_timeout":
        [(head, exc)] = app.rejected
        assert head is None and isinstance(exc, RequestTimeout)
    else:
        assert len(app.heads) == 1 and app.rejected == []


# --- refusing bad heads ------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        # The whole oversized head in one write: complete when it is first parsed.
        b"GET / HTTP/1.1\r\nHost: parkway.test\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n",
        # An oversized head that is still incomplete.
        b"GET / HTTP/1.1\r\nHost: parkway.test\r\nX-Big: " + b"a" * 4000,
    ],
    ids=["complete", "incomplete"],
)
async def test_head_larger_than_max_header_bytes_gets_431_then_close(autojump_clock, raw):
    app = FakeApp()
    async with serving(app) as run:
        client, _ = run.listener.connect()
        await client.stream.send_all(raw)
        reply = parse_response(await read_until_eof(client.stream))

    assert reply.closed
    assert reply.status == 431
    assert error_of(reply.body)["code"] == "headers_too_large"
    assert app.heads == []
    [(head, exc)] = app.rejected
    assert head is None and isinstance(exc, HeadersTooLarge)


async def test_garbage_request_line_gets_400_json_then_close(autojump_clock):
    app = FakeApp()
    async with serving(app) as run:
        client, stream = run.listener.connect()
        await client.stream.send_all(b"HELLO THERE\r\n\r\n")
        reply = parse_response(await read_until_eof(client.stream))
        await stream.closed.wait()

    assert reply.closed
    assert reply.status == 400
    assert reply.reason == b"Bad Request"
    assert reply.values("content-type") == [b"application/json"]
    assert reply.values("content-length") == [str(len(reply.body)).encode()]
    assert b"close" in reply.values("connection")
    error = error_of(reply.body)
    assert (error["type"], error["code"]) == ("invalid_request_error", "malformed_http")
    assert app.heads == []
    [(head, exc)] = app.rejected
    assert head is None and isinstance(exc, BadRequest)


# --- request bodies ------------------------------------------------------------------------

BODY_FRAMINGS = {
    "chunked": ([("Transfer-Encoding", "chunked")], [b"hello ", b"0\r\n\r\n", b"", b"world\x00\xff"]),
    "content-length": ([("Content-Length", "18")], [b"hello ", b"0\r\n\r\n", b"world\x00\xff"]),
}


@pytest.mark.parametrize("framing", BODY_FRAMINGS.values(), ids=BODY_FRAMINGS.keys())
async def test_body_chunks_yield_the_body_exactly(autojump_clock, framing):
    headers, pieces = framing
    received: list[bytes] = []

    async def collect(head: RequestHead, conn: HTTPConnection) -> None:
        async for chunk in conn.body_chunks():
            received.append(chunk)
        await conn.send_full(200, [(b"content-length", b"0")], b"")

    app = FakeApp(collect)
    async with serving(app) as run:
        client, _ = run.listener.connect()
        await client.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), *headers]))
        for piece in pieces:
            await client.send(h11.Data(data=piece))
            await wait_all_tasks_blocked()  # let the server read this piece on its own
        # The end of the body and the next request in one write: only the body is yielded.
        next_request = b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n"
        await client.stream.send_all(client.encode(h11.EndOfMessage()) + next_request)
        response, _ = await client.response()
        client.reuse()
        second, _ = await client.response()

    assert response.status_code == 200 and second.status_code == 200
    assert b"".join(received) == b"hello 0\r\n\r\nworld\x00\xff"
    assert all(received), "no empty chunks"
    assert [h.path for h in app.heads] == ["/", "/after"]


async def test_body_gap_over_client_body_timeout_is_request_timeout(autojump_clock):
    raised: list[tuple[float, Exception]] = []

    async def read(head: RequestHead, conn: HTTPConnection) -> None:
        try:
            async for _ in conn.body_chunks():
                pass
        except ParkwayError as exc:
            raised.append((trio.current_time(), exc))
            await send_error(conn, exc)

    app = FakeApp(read)
    async with serving(app) as run:
        client, _ = run.listener.connect()
        await client.send(
            h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "10")]),
            h11.Data(data=b"1234"),
        )
        sent = trio.current_time()
        response, body = await client.response()
        await client.assert_closed()

    [(when, exc)] = raised
    assert isinstance(exc, RequestTimeout)
    assert when - sent == pytest.approx(3.0)
    assert response.status_code == 408 and error_of(body)["code"] == "client_timeout"
    assert b"close" in header(response, b"connection")


@pytest.mark.parametrize("size, status", [(10, 200), (11, 413)])
async def test_read_body_refuses_more_than_limit(autojump_clock, size, status):
    raised: list[Exception] = []

    async def read_limited(head: RequestHead, conn: HTTPConnection) -> None:
        try:
            body = await conn.read_body(10)
        except ParkwayError as exc:
            raised.append(exc)
            await send_error(conn, exc)
        else:
            await conn.send_full(200, [(b"content-length", str(len(body)).encode())], body)

    app = FakeApp(read_limited)
    async with serving(app) as run:
        client, _ = run.listener.connect()
        await client.request("POST", body=b"x" * size)
        response, body = await client.response()
        if status == 413:
            await client.assert_closed()

    assert response.status_code == status
    if status == 200:
        assert body == b"x" * size and raised == []
        assert header(response, b"connection") == []
    else:
        [exc] = raised
        assert isinstance(exc, BodyTooLarge)
        assert error_of(body)["code"] == "body_too_large"
        assert b"close" in header(response, b"connection")


# --- writing -----------------------------------------------------------------------------


async def test_client_that_stops_reading_makes_send_data_raise_client_gone(autojump_clock):
    outcome: dict[str, object] = {}

    async def stream_forever(head: RequestHead, conn: HTTPConnection) -> None:
        await conn.send_head(200, [(b"content-type", b"text/event-stream")])
        started = trio.current_time()
        try:
            while True:
                await conn.send_data(b"data: token\n\n")
        except ClientGone as exc:
            outcome["after"] = trio.current_time() - started
            outcome["exc"] = exc
            raise

    app = FakeApp(stream_forever)
    async with serving(app) as run:
        client, stream = run.listener.connect(lockstep=True)
        await client.request()
        response = await client.next_event()  # reads the head, then never reads again
        assert isinstance(response, h11.Response) and response.status_code == 200
        await stream.closed.wait()

    assert isinstance(outcome["exc"], ClientGone)
    assert outcome["after"] == pytest.approx(7.0)


async def test_wait_disconnect_returns_when_the_client_closes_its_side(autojump_clock):
    waiting = trio.Event()
    returned = trio.Event()

    async def watch(head: RequestHead, conn: HTTPConnection) -> None:
        await conn.read_body(0)
        waiting.set()
        await conn.wait_disconnect()
        returned.set()

    app = FakeApp(watch)
    async with serving(app) as run:
        client, stream = run.listener.connect()
        await client.request()
        await waiting.wait()
        await wait_all_tasks_blocked()
        assert not returned.is_set()
        # Bytes of a pipelined next request are not a disconnect.
        await client.stream.send_all(b"GET /next HTTP/1.1\r\n")
        await wait_all_tasks_blocked()
        assert not returned.is_set()
        await client.stream.send_eof()
        await returned.wait()
        await stream.closed.wait()


# --- responses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, reason",
    [(200, b"OK"), (403, b"Forbidden"), (431, b"Request Header Fields Too Large"), (502, b"Bad Gateway")],
)
async def test_response_carries_the_reason_phrase(autojump_clock, status, reason):
    async def respond(head: RequestHead, conn: HTTPConnection) -> None:
        await conn.send_full(status, [(b"content-length", b"0")], b"")

    async with serving(FakeApp(respond)) as run:
        client, _ = run.listener.connect()
        await client.request()
        raw = await client.stream.receive_some()

    assert raw.startswith(b"HTTP/1.1 %d %s\r\n" % (status, reason))


async def test_a_whole_response_and_a_held_head_each_go_out_in_one_write(autojump_clock):
    async def respond(head: RequestHead, conn: HTTPConnection) -> None:
        if head.path == "/full":
            await conn.send_full(200, [(b"content-length", b"5")], b"hello")
        else:  # what the gateway does for a small fixed-length answer
            await conn.send_head(200, [(b"content-length", b"5")], flush=False)
            await conn.send_data(b"hello")
            await conn.send_end()

    async with serving(FakeApp(respond)) as run:
        client, server_end = run.listener.connect()
        writes: list[bytes] = []
        send_all = server_end.send_all

        async def recording_send_all(data) -> None:
            writes.append(bytes(data))
            await send_all(data)

        server_end.send_all = recording_send_all
        for path in ("/full", "/held"):
            await client.request(target=path)
            response, body = await client.response()
            assert (response.status_code, body) == (200, b"hello")
            client.reuse()

    assert len(writes) == 2, writes
    assert all(w.startswith(b"HTTP/1.1 200 OK\r\n") and w.endswith(b"\r\n\r\nhello") for w in writes), writes


async def test_refused_request_with_unread_body_gets_connection_close(autojump_clock):
    app = FakeApp(refuse_unread)
    async with serving(app) as run:
        client, stream = run.listener.connect()
        # The head promises a body that has not been sent when the refusal goes out.
        await client.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "1000")]))
        response, _ = await client.response()
        await client.assert_closed()
        await stream.closed.wait()

    assert response.status_code == 403
    assert b"close" in header(response, b"connection")


async def test_refused_get_without_body_keeps_the_connection_reusable(autojump_clock):
    app = FakeApp(refuse_unread)
    async with serving(app) as run:
        client, stream = run.listener.connect()
        await client.request(target="/one")
        first, _ = await client.response()
        client.reuse()
        await client.request(target="/two")
        second, _ = await client.response()
        assert not stream.closed.is_set()

    assert first.status_code == second.status_code == 403
    assert header(first, b"connection") == []
    assert [h.path for h in app.heads] == ["/one", "/two"]


async def test_an_upgrade_hands_the_connection_over_with_the_bytes_after_the_head(autojump_clock):
    """After hand_over() the application owns the stream: it gets what h11 read past the head,
    the server writes nothing more (no HTTP response) and closes it once the handler returns."""
    handed: list[tuple[bytes, bytes]] = []

    async def upgrade(head: RequestHead, conn: HTTPConnection) -> None:
        async for _ in conn.body_chunks():  # the (empty) body's end, as the gateway drains it
            pass
        stream, after_head = conn.hand_over()
        assert not conn.can_respond and not conn.reusable()
        await stream.send_all(b"101 from the new protocol")
        handed.append((after_head, await stream.receive_some(64)))

    app = FakeApp(upgrade)
    async with serving(app) as run:
        client, stream = run.listener.connect()
        request = client.encode(
            h11.Request(method="GET", target="/ws", headers=[("Host", "parkway.test"), ("Connection", "Upgrade"),
                                                            ("Upgrade", "websocket")]),
            h11.EndOfMessage(),
        )  # fmt: skip
        await client.stream.send_all(request + b"frame-1")  # a frame right behind the head
        assert await client.stream.receive_some() == b"101 from the new protocol"
        await client.stream.send_all(b"frame-2")
        await stream.closed.wait()
        assert await client.stream.receive_some() == b""  # nothing else was written: no HTTP answer

    assert handed == [(b"frame-1", b"frame-2")]


async def test_connection_over_max_connections_gets_503_with_retry_after(autojump_clock):
    app = FakeApp()
    async with serving(app, max_connections=1) as run:
        run.listener.connect()  # holds the only slot, idle
        client, _ = run.listener.connect()
        await client.request()
        response, body = await client.response()
        await client.assert_closed()

    assert response.status_code == 503
    assert header(response, b"retry-after") == [b"1"]
    assert error_of(body)["code"] == "overloaded"
    [(head, exc)] = app.rejected
    assert isinstance(exc, Overloaded) and head is not None and head.path == "/"
    assert app.heads == []


# --- shutdown ----------------------------------------------------------------------------


@pytest.mark.parametrize("served_before", [True, False], ids=["between-requests", "before-first-request"])
async def test_shutdown_closes_an_idle_connection_promptly(autojump_clock, served_before):
    app = FakeApp()
    async with serving(app) as run:
        client, stream = run.listener.connect()
        if served_before:
            await client.request()
            await client.response()
        await wait_all_tasks_blocked()  # the connection is accepted and waiting for a head
        run.server.shutdown()
        asked = trio.current_time()
        await client.assert_closed()
        await run.stopped.wait()
        assert trio.current_time() - asked == pytest.approx(0.0)
        assert stream.closed.is_set()


async def first_then_last(
    monkeypatch: pytest.MonkeyPatch,
    http_parser: str,
    as_last_arrives: Callable[[Running, Sweep | None], None],
    *,
    server_stops: bool = False,
) -> tuple[FakeApp, h11.Response, bytes]:
    """Serve ``/first``, then ``/last`` on the same kept-alive connection, with ``as_last_arrives``
    called in the instant ``/last``'s head has been read (nothing raised yet). Returns once the
    client saw the connection close and the server closed its end (and, with ``server_stops``,
    the server stopped): the app, ``/last``'s answer."""
    impl = type(open_connection(trio.testing.memory_stream_pair()[0], ServerConfig(**TIMEOUTS), PEER))
    assert impl.parser == http_parser
    read_head = impl.next_request
    app = FakeApp()
    running: list[Running] = []

    async def next_request(
        self: HTTPConnection, idle_timeout: float, scope: trio.CancelScope | None = None, sweep: Sweep | None = None
    ) -> RequestHead | None:
        head = await read_head(self, idle_timeout, scope, sweep)
        if head is not None and head.path == "/last":
            as_last_arrives(running[0], sweep)
        return head

    monkeypatch.setattr(impl, "next_request", next_request)
    async with serving(app) as run:
        running.append(run)
        client, stream = run.listener.connect()
        await client.request(target="/first")
        assert (await client.response())[0].status_code == 200
        client.reuse()
        await client.request(target="/last")
        response, body = await client.response()
        await client.assert_closed()
        await stream.closed.wait()
        if server_stops:
            await run.stopped.wait()
    return app, response, body


async def test_a_head_that_arrives_as_shutdown_begins_is_answered_then_the_connection_closed(
    autojump_clock, monkeypatch, http_parser
):
    """Shutdown cancels a connection waiting for a head; one whose head came in the same
    instant (read, nothing raised) is still answered, with the connection closed after it."""

    def shutdown(run: Running, _sweep: Sweep | None) -> None:
        run.server.shutdown()

    app, response, body = await first_then_last(monkeypatch, http_parser, shutdown, server_stops=True)
    assert (response.status_code, body) == (200, b"/last ")
    assert header(response, b"connection") == [b"close"]
    assert [head.path for head in app.heads] == ["/first", "/last"]


async def test_a_head_that_arrives_as_its_deadline_fires_is_answered_then_the_connection_closed(
    autojump_clock, monkeypatch, http_parser
):
    """The head's timeouts cancel the connection's scope (the sweep does): one that fires in the
    instant a head came (read, nothing raised) must not cancel its handler; the head is answered, last."""

    def deadline_passes(_run: Running, sweep: Sweep | None) -> None:
        assert sweep is not None
        sweep.expire(math.inf)  # what the sweep does when the deadline passes before the scope is taken out

    app, response, body = await first_then_last(monkeypatch, http_parser, deadline_passes)
    assert (response.status_code, body) == (200, b"/last ")
    assert header(response, b"connection") == [b"close"]
    assert [head.path for head in app.heads] == ["/first", "/last"]
    assert app.rejected == []


async def test_shutdown_lets_an_in_flight_request_finish_within_the_drain(autojump_clock):
    release = trio.Event()

    async def slow(head: RequestHead, conn: HTTPConnection) -> None:
        await release.wait()
        await echo_body(head, conn)

    app = FakeApp(slow)
    async with serving(app) as run:
        client, _ = run.listener.connect()
        await client.request(target="/slow")
        await app.entered.wait()
        run.server.shutdown()
        asked = trio.current_time()
        await trio.sleep(10)  # well inside drain_timeout (30 s)
        release.set()
        response, body = await client.response()
        await client.assert_closed()
        await run.stopped.wait()
        assert trio.current_time() - asked == pytest.approx(10.0)

    assert (response.status_code, body) == (200, b"/slow ")


async def test_drain_timeout_cancels_a_handler_that_never_finishes(autojump_clock):
    cancelled = trio.Event()

    async def forever(head: RequestHead, conn: HTTPConnection) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    app = FakeApp(forever)
    async with serving(app) as run:
        client, stream = run.listener.connect()
        await client.request()
        await app.entered.wait()
        run.server.shutdown()
        asked = trio.current_time()
        await stream.closed.wait()
        assert trio.current_time() - asked == pytest.approx(30.0)
        await run.stopped.wait()
        assert trio.current_time() - asked == pytest.approx(30.0)
        assert cancelled.is_set()
        assert await read_until_eof(client.stream) == b""  # no response was started


# --- over real sockets: the client face reads and writes the socket itself -----------------

REAL_GUARD = 60  # real seconds: only a hang reaches it


@asynccontextmanager
async def serving_tcp(app: FakeApp, **overrides) -> AsyncIterator[Callable[[], Awaitable[trio.SocketStream]]]:
    """``Server.serve`` on a real listening socket on 127.0.0.1, and a way to connect to it;
    shut down, and the clients closed, when the block ends."""
    server = Server(ServerConfig(**{**TIMEOUTS, **overrides}), app)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    clients: list[trio.SocketStream] = []

    async def connect() -> trio.SocketStream:
        clients.append(await trio.open_tcp_stream("127.0.0.1", port))
        return clients[-1]

    with trio.fail_after(REAL_GUARD):
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, listeners)
                yield connect
                server.shutdown()
        finally:
            for client in clients:
                await trio.aclose_forcefully(client)


async def test_pipelined_requests_on_a_socket_each_let_other_tasks_run():
    """Requests already buffered are read without touching the socket: each still yields once,
    so a client that pipelines many cheap requests cannot keep every other task waiting."""
    ticks = 0
    seen: list[int] = []

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    async def answer(head: RequestHead, conn: HTTPConnection) -> None:
        seen.append(ticks)
        await refuse_unread(head, conn)

    count = 60
    async with serving_tcp(FakeApp(answer)) as connect, trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        stream = await connect()
        pipelined = b"".join(b"GET /%d HTTP/1.1\r\nhost: x\r\n\r\n" % i for i in range(count - 1))
        await stream.send_all(pipelined + b"GET /last HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        raw = await read_until_eof(stream)
        nursery.cancel_scope.cancel()

    assert raw.count(b"HTTP/1.1 403 ") == count
    assert len(seen) == count
    # The ticker runs once per scheduler batch, before or after the connection's task (the order
    # in a batch is random): about once per request when each yields, not at all when none does.
    assert seen[-1] - seen[0] >= count // 2, seen


async def test_a_body_trickling_in_over_a_socket_is_read_exactly():
    async with serving_tcp(FakeApp()) as connect:
        stream = await connect()
        body = bytes(range(256)) * 1024
        await stream.send_all(
            b"POST /up HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        for i in range(0, len(body), 50_000):
            await stream.send_all(body[i : i + 50_000])
            await trio.sleep(0.01)  # separate reads, some of which wait for the socket
        reply = parse_response(await read_until_eof(stream), "POST")

    assert reply.status == 200
    assert reply.body == b"/up " + body


async def test_a_client_that_stops_reading_a_socket_makes_sends_raise_client_gone_after_the_write_timeout():
    outcome: dict[str, object] = {}

    async def stream_forever(head: RequestHead, conn: HTTPConnection) -> None:
        await conn.send_head(200, [(b"content-type", b"text/event-stream")])
        chunk = b"data: " + b"x" * 65536 + b"\n\n"
        started = trio.current_time()
        try:
            while True:
                await conn.send_data(chunk)
        except ClientGone as exc:
            outcome["after"] = trio.current_time() - started
            outcome["exc"] = exc
            outcome["out"] = conn.bytes_out
            raise

    async with serving_tcp(FakeApp(stream_forever), client_write_timeout=0.5) as connect:
        stream = await connect()
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        while "exc" not in outcome:  # never reads
            await trio.sleep(0.05)

    assert "did not read the response for 0.5 s" in str(outcome["exc"])
    assert 0.5 <= outcome["after"] < REAL_GUARD  # type: ignore[operator]
    assert outcome["out"] > 65536  # type: ignore[operator]


# --- listen addresses --------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, expected",
    [("127.0.0.1:3000", ("127.0.0.1", 3000)), ("[::1]:8080", ("::1", 8080)), ("0.0.0.0:0", ("0.0.0.0", 0))],
)
def test_listen_address_parsing(address, expected):
    # open_listeners binds with config.split_host_port (it replaced http_server.parse_listen).
    assert split_host_port(address) == expected


# --- check_head and the header map (pure) -------------------------------------------------


@pytest.mark.parametrize("control", [0x00, 0x01, 0x0A, 0x0D, 0x1B, 0x1F, 0x7F])
def test_a_control_character_in_any_value_is_refused_naming_its_header(control):
    from proxy.http.connection import check_head

    headers = [(b"host", b"x"), (b"x-ok", b"a\tb"), (b"x-bad", b"a" + bytes([control]) + b"b"), (b"x-last", b"c")]
    with pytest.raises(BadRequest, match="header x-bad has a control character"):
        check_head(headers)
    assert check_head(headers, controls=False)[b"x-bad"] == headers[2][1]  # a head llhttp read: not searched


def test_the_header_map_joins_repeats_in_order_and_refuses_length_beside_chunked():
    from proxy.http.connection import check_head

    fields = check_head([(b"host", b"x"), (b"x-a", b"1"), (b"x-b", b"\t"), (b"x-a", b"2, 3"), (b"x-a", b"")])
    assert fields == {b"host": b"x", b"x-a": b"1, 2, 3, ", b"x-b": b"\t"}
    with pytest.raises(BadRequest, match="both Content-Length and Transfer-Encoding"):
        check_head([(b"transfer-encoding", b"chunked"), (b"host", b"x"), (b"content-length", b"1")])
    by_hand = RequestHead("GET", "/", ((b"x-a", b"1"), (b"x-a", b"caf\xe9")), "1.1", PEER)
    assert (by_hand.header(b"x-a"), by_hand.header(b"x-b")) == ("1, caf\u00e9", None)
