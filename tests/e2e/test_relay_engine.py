"""The relay on real sockets, on both of its drivers (the epoll engine and the portable one).

Byte for byte: an upstream's chunked framing reaches an HTTP/1.1 client unchanged (extensions
and trailers included), an HTTP/1.0 client gets the de-chunked body up to the close, and a TLS
upstream streams like a plain one. Failures: malformed chunked framing is refused (the stream
is cut, the log says why), a client that stops reading stops its upstream being read without
slowing another stream, and the overall limit cuts a stream that is still going.
"""

from __future__ import annotations

import os
import select
from pathlib import Path

import pytest
import trio

from proxy.relay import engine as engine_module
from support.http import request_bytes
from support.logs import watch_logs
from support.scripted import ScriptedRequest, ScriptedUpstream, TLSUpstream, answer_with, make_certificate
from support.upstream import SSE_HEADERS, Exchange

HANG_LIMIT = 20.0
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


pytestmark = pytest.mark.usefixtures("relay_path")  # every test on both drivers (conftest)


@pytest.fixture
async def scripted(nursery: trio.Nursery) -> ScriptedUpstream:
    return await nursery.start(ScriptedUpstream().serve)


async def open_stream(port: int, url: str, *, http10: bool = False, close: bool = False) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = request_bytes("GET", url, headers=[("connection", "close")] if close else [])
    if http10:
        data = data.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    await stream.send_all(data)
    return stream


async def receive_until(stream: trio.abc.ReceiveStream, marker: bytes, got: bytes = b"") -> bytes:
    while marker not in got:
        data = await stream.receive_some(65536)
        assert data, f"closed before {marker!r}: {got!r}"
        got += data
    return got


async def read_to_close(stream: trio.abc.ReceiveStream) -> bytes:
    out = b""
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return out
        if not data:
            return out
        out += data


def paced(*pieces: bytes, gap: trio.Event | None = None):
    """An answer sent piece by piece (each its own TCP segment), optionally pausing for ``gap``."""

    async def answer(req: ScriptedRequest) -> None:
        for i, piece in enumerate(pieces):
            await req.send(piece)
            if gap is not None and i == 0:
                await gap.wait()
            await trio.sleep(0.01)  # separate segments: the relay must join them by framing alone

    return answer


EVENTS = (b"data: 1\r\n\r\n", b"data: two\n\n", b"data: 3\r\n\r\n")
WIRE_BODY = (
    b"b;ext=a\r\n" + EVENTS[0] + b"\r\n"  # an extension on the size line is dropped (docs/proxying.md)
    b"b\r\n" + EVENTS[1] + b"\r\n"
    b"B\r\n" + EVENTS[2] + b"\r\n"
    b"0\r\nx-usage: 7\r\n\r\n"  # trailers
)


async def test_chunked_framing_passes_through_to_an_http11_client_unchanged(start_parkway, scripted):
    pieces = [CHUNKED_HEAD, WIRE_BODY[:20], WIRE_BODY[20:37], WIRE_BODY[37:]]
    scripted.answers = [paced(*pieces)]
    parkway = await start_parkway()

    with trio.fail_after(5):
        async with await open_stream(parkway.port, parkway.sign(f"{scripted.base}/v1/chat")) as stream:
            raw = await receive_until(stream, b"\r\n\r\n0\r\nx-usage: 7\r\n\r\n")

    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower()
    assert body == WIRE_BODY.replace(b"b;ext=a\r\n", b"b\r\n")  # the rest byte for byte


async def test_an_http10_client_gets_the_body_without_chunks_until_the_close(start_parkway, scripted):
    scripted.answers = [paced(CHUNKED_HEAD, WIRE_BODY[:30], WIRE_BODY[30:])]
    parkway = await start_parkway()

    with trio.fail_after(5):
        async with await open_stream(parkway.port, parkway.sign(f"{scripted.base}/v1/chat"), http10=True) as stream:
            raw = await read_to_close(stream)

    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"".join(EVENTS)


async def test_usage_is_read_from_the_deframed_stream(start_parkway, scripted):
    usage = b'data: {"usage":{"prompt_tokens":11,"completion_tokens":5}}\n\n'
    wire = b"%x\r\n%s\r\n0\r\n\r\n" % (len(usage), usage)
    scripted.answers = [paced(CHUNKED_HEAD, wire[:25], wire[25:])]  # the usage line split across chunks
    parkway = await start_parkway()

    with watch_logs() as logs:
        with trio.fail_after(5):
            async with await open_stream(parkway.port, parkway.sign(f"{scripted.base}/v1/chat")) as stream:
                await receive_until(stream, b"0\r\n\r\n")
            entry = await logs.wait_for(event="request", outcome="ok")

    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (11, 5)


@pytest.mark.parametrize(
    "bad",
    [b"zz\r\ndata\r\n", b"4\r\ndata: too long\r\n", b"4\r\ndataXX", b"3;\n"],
    ids=["not-hex", "longer-than-size", "no-crlf-after-data", "bare-lf"],
)
async def test_malformed_chunked_framing_is_refused_and_logged(start_parkway, scripted, bad):
    good = b"8\r\ndata: 1\n\r\n"
    scripted.answers = [paced(CHUNKED_HEAD + good, bad)]
    parkway = await start_parkway()

    with watch_logs() as logs:
        with trio.fail_after(5):
            async with await open_stream(parkway.port, parkway.sign(f"{scripted.base}/v1/chat")) as stream:
                raw = await read_to_close(stream)
            entry = await logs.wait_for(event="request", outcome="upstream_error")

    assert raw.endswith(good)  # what came before the fault, then the cut: no terminator
    assert "chunk" in entry["error"]
    assert entry["status"] == 200


async def test_tls_upstream_streams_byte_for_byte(start_parkway, nursery, tmp_path: Path):
    certificate = make_certificate(tmp_path)
    events = [b"data: %d %s\n\n" % (i, os.urandom(40).hex().encode()) for i in range(20)]
    release = trio.Event()

    async def stream_events(ex: Exchange) -> None:
        await ex.send_head(200, SSE_HEADERS)
        await ex.send_data(events[0])
        await release.wait()  # the first event reaches the client while the rest is held
        for event in events[1:]:
            await ex.send_data(event)
        await ex.send_end()

    upstream = await nursery.start(TLSUpstream(certificate, stream_events).serve)
    parkway = await start_parkway(upstream_ca_file=str(certificate.cert))

    with watch_logs() as logs:
        with trio.fail_after(5):
            async with await open_stream(parkway.port, parkway.sign(f"{upstream.base}/v1/chat")) as stream:
                got = await receive_until(stream, events[0])
                release.set()
                got = await receive_until(stream, b"\r\n0\r\n\r\n", got)
            entry = await logs.wait_for(event="request", outcome="ok")

    body = got.partition(b"\r\n\r\n")[2]
    assert body == b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    assert entry["upstream_host"] == upstream.base.removeprefix("https://")


async def test_tls_upstream_with_an_unknown_certificate_is_refused(start_parkway, nursery, tmp_path: Path):
    upstream = await nursery.start(TLSUpstream(make_certificate(tmp_path)).serve)
    parkway = await start_parkway()  # trusts the system's CAs only

    with watch_logs() as logs:
        with trio.fail_after(5):
            async with await open_stream(
                parkway.port, parkway.sign(f"{upstream.base}/v1/models"), close=True
            ) as stream:
                raw = await read_to_close(stream)
            entry = await logs.wait_for(event="request", outcome="upstream_error")

    assert raw.startswith(b"HTTP/1.1 502 ")
    assert "certificate" in entry["error"].lower()
    assert upstream.requests == []


async def test_a_client_that_stops_reading_stops_its_upstream_and_slows_no_other(start_parkway, upstream):
    parkway = await start_parkway(client_write_timeout=3.0)
    sent = {"slow": 0}
    stalled = trio.Event()
    fast_events = [b"data: fast %d\n\n" % i for i in range(10)]

    async def behaviour(ex: Exchange) -> None:
        await ex.send_head(200, SSE_HEADERS)
        if "slow" in ex.request.target:
            block = b"data: " + b"x" * 65536 + b"\n\n"
            while True:
                with trio.move_on_after(0.5) as blocked:  # Parkway stopped reading us: our send waits
                    await ex.send_data(block)
                if blocked.cancelled_caught:
                    stalled.set()
                    await trio.sleep_forever()
                sent["slow"] += len(block)
        else:
            for event in fast_events:
                await ex.send_data(event)
                await trio.sleep(0.02)
            await ex.send_end()

    upstream.behaviour = behaviour
    with trio.fail_after(10):
        slow = await open_stream(parkway.port, parkway.sign(f"{upstream.base}/v1/chat?slow"))
        async with slow:
            await receive_until(slow, b"200 OK")  # then never read again
            await stalled.wait()
            # Bounded: the socket buffers on both sides and at most one read in Parkway, no queue.
            assert sent["slow"] < 32 * 1024 * 1024
            started = trio.current_time()
            async with await open_stream(parkway.port, parkway.sign(f"{upstream.base}/v1/chat?fast")) as fast:
                got = await receive_until(fast, b"\r\n0\r\n\r\n")
            assert trio.current_time() - started < 1.5
    assert all(event in got for event in fast_events)


async def test_the_overall_limit_cuts_a_stream_still_going(start_parkway, upstream):
    parkway = await start_parkway(request_timeout=0.5, upstream_idle_timeout=5.0)

    async def endless(ex: Exchange) -> None:
        await ex.send_head(200, SSE_HEADERS)
        while True:
            await ex.send_data(b"data: tick\n\n")
            await trio.sleep(0.05)

    upstream.behaviour = endless
    with watch_logs() as logs:
        with trio.fail_after(5):
            async with await open_stream(parkway.port, parkway.sign(f"{upstream.base}/v1/chat")) as stream:
                started = trio.current_time()
                raw = await read_to_close(stream)
                elapsed = trio.current_time() - started
            entry = await logs.wait_for(event="request", outcome="upstream_error")
            await upstream.disconnected.wait()  # the upstream was hung up on

    assert b"data: tick" in raw and not raw.endswith(b"0\r\n\r\n")
    assert 0.4 < elapsed < 2.0
    assert "overall limit" in entry["error"]


async def test_answers_without_a_body_complete_at_once(start_parkway, scripted):
    scripted.answers = [answer_with(b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n")]
    parkway = await start_parkway()

    with trio.fail_after(5):
        async with await open_stream(parkway.port, parkway.sign(f"{scripted.base}/v1/a")) as stream:
            raw = await receive_until(stream, b"\r\n\r\n")

    assert raw.startswith(b"HTTP/1.1 204 ") and raw.endswith(b"\r\n\r\n")


async def test_a_client_leaving_mid_stream_hangs_up_on_the_upstream_at_once(start_parkway, upstream):
    parkway = await start_parkway(upstream_idle_timeout=30.0)

    async def one_event_then_wait(ex: Exchange) -> None:
        await ex.send_head(200, SSE_HEADERS)
        await ex.send_data(b"data: 1\n\n")
        await trio.sleep_forever()  # a model still thinking: only the client leaving ends this

    upstream.behaviour = one_event_then_wait
    with watch_logs() as logs:
        with trio.fail_after(5):
            stream = await open_stream(parkway.port, parkway.sign(f"{upstream.base}/v1/chat"))
            await receive_until(stream, b"data: 1\n\n")
            await stream.aclose()
            left = trio.current_time()
            await upstream.disconnected.wait()
            hung_up = trio.current_time() - left
            entry = await logs.wait_for(event="request", outcome="client_gone")

    assert hung_up < 1.0  # noticed by the relay itself, not by a timeout
    assert entry["status"] == 200


_EPOLL = getattr(select, "epoll", None)


class _CountingEpoll:
    """The engine's epoll, counting registrations (each fd added to the set), changes, removals and
    the calls that failed (each a system call for nothing)."""

    registered: list[int] = []
    modified: list[int] = []  # each fd whose registration was changed
    unregistered: list[int] = []
    failed: list[tuple[str, int, int | None]] = []  # (call, fd, errno)

    def __init__(self) -> None:
        self._epoll = _EPOLL()
        self.fileno, self.poll, self.close = self._epoll.fileno, self._epoll.poll, self._epoll.close

    def _call(self, name: str, fd: int, *args: int) -> None:
        try:
            getattr(self._epoll, name)(fd, *args)
        except OSError as exc:  # e.g. a stale fd (its socket closed): not counted as done
            _CountingEpoll.failed.append((name, fd, exc.errno))
            raise

    def register(self, fd: int, eventmask: int) -> None:
        self._call("register", fd, eventmask)
        _CountingEpoll.registered.append(fd)

    def modify(self, fd: int, eventmask: int) -> None:
        self._call("modify", fd, eventmask)
        _CountingEpoll.modified.append(fd)

    def unregister(self, fd: int) -> None:
        self._call("unregister", fd)
        _CountingEpoll.unregistered.append(fd)


def count_engine_calls(relay_path: str, monkeypatch: pytest.MonkeyPatch) -> type[_CountingEpoll]:
    """Count the calls on the epoll set of each engine started from now on (the test's body: the
    fixtures' own epolls, made before, are left alone)."""
    if relay_path != "epoll":
        pytest.skip("the epoll engine's registrations")
    monkeypatch.setattr(engine_module.select, "epoll", _CountingEpoll)
    for name in ("registered", "modified", "unregistered", "failed"):
        monkeypatch.setattr(_CountingEpoll, name, [])
    return _CountingEpoll


async def test_a_kept_alive_client_is_registered_with_the_engine_once(start_parkway, scripted, relay_path, monkeypatch):
    counting_epoll = count_engine_calls(relay_path, monkeypatch)
    # Each answer's body comes with its head: the relay ends at once, registering no upstream.
    scripted.answers = [answer_with(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello") for _ in range(6)]
    parkway = await start_parkway()
    url = parkway.sign(f"{scripted.base}/v1/a")
    with trio.fail_after(10):
        for _connection in range(2):  # the second connection likely gets the first one's fd number back
            async with await trio.open_tcp_stream("127.0.0.1", parkway.port) as stream:
                for _ in range(3):
                    await stream.send_all(request_bytes("GET", url))
                    raw = await receive_until(stream, b"\r\n\r\nhello")
                    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"hello")
            await trio.sleep(0.05)  # let Parkway close its side

    # Each connection's client socket is registered once (watched while its requests wait), and
    # stays registered between its requests: watching the next one costs no system call.
    assert len(counting_epoll.registered) == 2, counting_epoll.registered
    assert counting_epoll.modified == [], counting_epoll.modified
    assert counting_epoll.failed == [], counting_epoll.failed


async def test_a_stream_costs_its_upstreams_add_and_delete(start_parkway, scripted, relay_path, monkeypatch):
    """A stream costs the engine the add and the delete of its upstream's fd and the add of its
    client's, nothing more: the client is not changed when the body ends (it never filled up),
    nor deleted when it leaves (its watch disarms itself; the close takes it out of the set), and
    no call fails, also for a new connection that got a closed one's fd number back."""
    counting_epoll = count_engine_calls(relay_path, monkeypatch)
    scripted.answers = [paced(CHUNKED_HEAD, b"5\r\nhello\r\n", b"0\r\n\r\n") for _ in range(3)]
    parkway = await start_parkway()
    url = parkway.sign(f"{scripted.base}/v1/chat")
    with trio.fail_after(10):
        # The client leaves first (its watch fires), then Parkway closes first (connection: close),
        # then a connection likely on the last one's fd number.
        for close in (False, True, False):
            async with await open_stream(parkway.port, url, close=close) as stream:
                raw = await receive_until(stream, b"hello\r\n0\r\n\r\n")
                assert raw.startswith(b"HTTP/1.1 200 ")
                if close:
                    assert (await read_to_close(stream)) == b""
            await trio.testing.wait_all_tasks_blocked(0.05)  # Parkway has taken the client's leaving in

    assert counting_epoll.failed == [], counting_epoll.failed
    assert counting_epoll.modified == [], counting_epoll.modified
    assert len(counting_epoll.registered) == 6, counting_epoll.registered  # 3 clients, 3 upstream streams
    assert len(counting_epoll.unregistered) == 3, counting_epoll.unregistered  # the upstream's, at each end
    assert set(counting_epoll.unregistered) < set(counting_epoll.registered)
