"""proxy.websocket.session: one session, end to end on loopback, without the gateway.

A request head is parsed with h11 (as the HTTP server does), then the shell takes over:
the upstream is the Realtime stand-in (or a raw wsproto peer that misbehaves), the client a
trio-websocket client (or a raw wsproto one that sends fragments or drops the connection).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import wsproto
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Message, TextMessage

from proxy.app import Parkway
from proxy.relay.usage import Usage
from proxy.websocket.policy import WebSocketConfig
from proxy.websocket.session import SessionPlan, WebSocketProxy
from support.parkway import make_config
from support.processes import free_port
from support.websocket import (
    USAGE,
    RawPeer,
    RealtimeUpstream,
    SessionHarness,
    UpstreamSession,
    accept_raw,
    echo,
    event,
    plan_for,
    proxy_with,
    raw_server,
    self_signed,
    ws_client,
)

HANG_LIMIT = 15.0
WAIT = 5.0  # bound on each wait below
pytestmark = pytest.mark.usefixtures("hang_guard")


@pytest.fixture
async def realtime(nursery: trio.Nursery) -> RealtimeUpstream:
    return await nursery.start(RealtimeUpstream().serve)


@pytest.fixture
def start_harness(nursery: trio.Nursery) -> Callable[..., Any]:
    async def start(plan: SessionPlan, ssl_context: ssl.SSLContext | None = None, **settings: Any) -> SessionHarness:
        return await nursery.start(SessionHarness(proxy_with(ssl_context, **settings), plan).serve)

    return start


def _connect(harness: SessionHarness, **kw: Any) -> Any:
    return ws_client(harness.port, "/?X-Sw-Credential=test", **kw)


async def test_messages_both_ways_with_the_injected_key_and_the_upstreams_subprotocol(
    realtime: RealtimeUpstream, start_harness: Callable[..., Any]
) -> None:
    harness = await start_harness(plan_for(realtime.url, subprotocols=("realtime", "openai-beta.realtime-v1")))
    with trio.fail_after(WAIT):
        async with _connect(harness, subprotocols=["realtime", "openai-beta.realtime-v1"]) as ws:
            assert ws.subprotocol == "realtime"
            assert ("x-request-id", "test") in [(n.decode().lower(), v.decode()) for n, v in ws.handshake_headers]
            assert json.loads(await ws.get_message())["type"] == "session.created"
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            await ws.send_message(b"\x00\x01binary\xff")
            assert await ws.get_message() == b"\x00\x01binary\xff"
            await ws.send_message(event("response.create"))
            kinds = [json.loads(await ws.get_message())["type"] for _ in range(4)]
            assert kinds == ["response.output_audio.delta"] * 3 + ["response.done"]
        (finished,) = await harness.wait_finished()
    session = realtime.sessions[0]
    assert session.headers["authorization"] == "Bearer sk-upstream-key"
    assert session.subprotocols == ("realtime", "openai-beta.realtime-v1")
    assert session.path == "/v1/realtime?model=gpt-realtime"
    report = finished.report
    assert report.accepted and report.subprotocol == "realtime"
    assert (report.from_client.messages, report.from_upstream.messages) == (3, 7)
    assert report.from_client.bytes == len("hello") + len(b"\x00\x01binary\xff") + len(event("response.create"))
    assert report.usage == Usage(USAGE["input_tokens"], USAGE["output_tokens"], USAGE["total_tokens"])
    assert (report.outcome, report.closed_by, report.client_code, report.upstream_code) == ("ok", "client", 1000, 1000)


async def test_a_large_message_passes_with_the_default_limit(
    start_harness: Callable[..., Any], nursery: trio.Nursery
) -> None:
    upstream = await nursery.start(RealtimeUpstream(echo).serve)
    harness = await start_harness(plan_for(upstream.url))
    big = b"\x5a" * (3 << 20)  # above trio-websocket's own 1 MiB default
    with trio.fail_after(WAIT):
        async with _connect(harness, max_message_size=8 << 20) as ws:
            await ws.send_message(big)
            assert await ws.get_message() == big


async def test_fragmented_messages_arrive_whole(start_harness: Callable[..., Any], nursery: trio.Nursery) -> None:
    upstream = await nursery.start(RealtimeUpstream(echo).serve)
    harness = await start_harness(plan_for(upstream.url))
    with trio.fail_after(WAIT):
        client, answer = await RawPeer.connect(harness.port, "/", subprotocols=("realtime",))
        async with client.stream:
            assert isinstance(answer, AcceptConnection)
            await client.send(
                TextMessage("Hel", message_finished=False),
                TextMessage("lo, ", message_finished=False),
                TextMessage("world", message_finished=True),
            )
            session = await upstream.wait_session()
            assert await session.wait_received(1) == ["Hello, world"]
            got = await client.next_event()
            assert isinstance(got, Message) and got.data == "Hello, world" and got.message_finished


async def test_pings_are_answered_while_the_other_direction_is_busy(
    start_harness: Callable[..., Any], nursery: trio.Nursery
) -> None:
    flowing = trio.Event()

    async def stream_forever(session: UpstreamSession) -> None:
        chunk = "x" * 32768
        for i in range(1_000_000):
            await session.ws.send_message(chunk)
            if i == 20:
                flowing.set()

    upstream = await nursery.start(RealtimeUpstream(stream_forever).serve)
    harness = await start_harness(plan_for(upstream.url))
    async with _connect(harness) as ws:

        async def read(ws: WebSocketConnection) -> None:
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.get_message()

        nursery.start_soon(read, ws)
        with trio.fail_after(WAIT):
            await flowing.wait()
            for _ in range(5):
                await ws.ping()  # answered by Parkway while the upstream floods the client


async def test_close_codes_pass_through_from_the_client(
    realtime: RealtimeUpstream, start_harness: Callable[..., Any]
) -> None:
    harness = await start_harness(plan_for(realtime.url))
    with trio.fail_after(WAIT):
        async with _connect(harness) as ws:
            await ws.get_message()
            await ws.aclose(4001, "user hung up")
        session = await realtime.wait_session()
        await session.ended.wait()
        (finished,) = await harness.wait_finished()
    assert session.close is not None
    assert (session.close.code, session.close.reason) == (4001, "user hung up")
    assert (finished.report.outcome, finished.report.closed_by, finished.report.upstream_code) == ("ok", "client", 4001)


@pytest.mark.parametrize(
    ("upstream_close", "client_sees"),
    [
        ((4000, "session expired"), (4000, "session expired")),
        ((1000, None), (1000, None)),
        ((1011, "internal"), (1011, "internal")),
    ],
)
async def test_close_codes_pass_through_from_the_upstream(
    start_harness: Callable[..., Any],
    nursery: trio.Nursery,
    upstream_close: tuple[int, str | None],
    client_sees: tuple[int, str | None],
) -> None:
    async def close_after_one(session: UpstreamSession) -> None:
        await session.receive()
        await session.ws.aclose(*upstream_close)

    upstream = await nursery.start(RealtimeUpstream(close_after_one).serve)
    harness = await start_harness(plan_for(upstream.url))
    with trio.fail_after(WAIT):
        async with _connect(harness) as ws:
            await ws.send_message("bye?")
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
        (finished,) = await harness.wait_finished()
    assert caught.value.reason is not None
    assert (caught.value.reason.code, caught.value.reason.reason) == client_sees
    expected = "upstream_error" if upstream_close[0] == 1011 else "ok"
    assert (finished.report.outcome, finished.report.closed_by) == (expected, "upstream")
    assert finished.report.level == ("error" if expected == "upstream_error" else "info")


async def test_an_upstream_close_without_a_code_reaches_the_client_as_1000(
    start_harness: Callable[..., Any], nursery: trio.Nursery
) -> None:
    async def bare_close(stream: trio.SocketStream) -> None:
        peer = await accept_raw(stream)
        await peer.send(CloseConnection(code=1005))  # wsproto sends a close frame without a code
        await peer.next_event()

    port = await nursery.start(raw_server, bare_close)
    harness = await start_harness(plan_for(f"ws://127.0.0.1:{port}/"))
    with trio.fail_after(WAIT):
        async with _connect(harness) as ws:
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
    assert caught.value.reason is not None and caught.value.reason.code == 1000


async def test_a_client_message_over_the_limit_closes_it_with_1009_and_never_reaches_the_upstream(
    realtime: RealtimeUpstream, start_harness: Callable[..., Any]
) -> None:
    harness = await start_harness(plan_for(realtime.url), max_message_size=65536)
    with trio.fail_after(WAIT):
        async with _connect(harness) as ws:
            await ws.get_message()
            await ws.send_message("small")
            assert await ws.get_message() == "small"
            await ws.send_message("y" * 65537)
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
        session = await realtime.wait_session()
        await session.ended.wait()
        (finished,) = await harness.wait_finished()
    assert caught.value.reason is not None and caught.value.reason.code == 1009
    assert session.received == ["small"]
    assert session.close is not None and session.close.code == 1001
    assert finished.report.outcome == "message_too_big"


async def test_an_upstream_message_over_the_limit_closes_the_client_with_1009(
    start_harness: Callable[..., Any], nursery: trio.Nursery
) -> None:
    async def too_big(session: UpstreamSession) -> None:
        await session.ws.send_message(b"z" * 70000)
        await session.receive()

    upstream = await nursery.start(RealtimeUpstream(too_big).serve)
    harness = await start_harness(plan_for(upstream.url), max_message_size=65536)
    with trio.fail_after(WAIT):
        async with _connect(harness) as ws:
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
        session = await upstream.wait_session()
        await session.ended.wait()
    assert caught.value.reason is not None and caught.value.reason.code == 1009
    assert "upstream sent a message above 65536 bytes" in (caught.value.reason.reason or "")
    assert session.close is not None and session.close.code == 1009


async def test_a_slow_client_back_pressures_the_upstream(
    start_harness: Callable[..., Any], nursery: trio.Nursery
) -> None:
    """The client reads nothing: the upstream must soon be unable to send, not fill Parkway's memory."""
    total, size = 400, 256 * 1024  # 100 MiB if nothing pushed back
    sent = 0
    progress = trio.Event()

    async def flood(session: UpstreamSession) -> None:
        nonlocal sent, progress
        for i in range(total):
            await session.ws.send_message(i.to_bytes(4, "big") * (size // 4))
            sent += 1
            progress.set()
            progress = trio.Event()

    upstream = await nursery.start(RealtimeUpstream(flood).serve)
    harness = await start_harness(plan_for(upstream.url), message_queue_size=2)
    async with _connect(harness, max_message_size=1 << 20, message_queue_size=1) as ws:
        with trio.fail_after(WAIT):
            while True:  # until the upstream has been stuck for 0.5 s
                with trio.move_on_after(0.5) as stalled:
                    await progress.wait()
                if stalled.cancelled_caught:
                    break
        # Kernel socket buffers on loopback hold a few MiB per connection; Parkway only its queues.
        assert sent < 120, f"the upstream sent {sent} x 256 KiB to a client that reads nothing"
        with trio.fail_after(WAIT):
            for i in range(sent + 5):
                message = await ws.get_message()
                assert message[:4] == i.to_bytes(4, "big")  # nothing lost, in order


@pytest.mark.parametrize("sent_first", [1, 0])  # 0: the 101 and the end arrive in one read
async def test_an_upstream_that_vanishes_closes_the_client_with_1011_as_an_error(
    start_harness: Callable[..., Any], nursery: trio.Nursery, sent_first: int
) -> None:
    async def vanish(stream: trio.SocketStream) -> None:
        peer = await accept_raw(stream)
        for _ in range(sent_first):
            await peer.send(TextMessage("one"))
        await stream.aclose()  # no close frame: the process died

    port = await nursery.start(raw_server, vanish)
    harness = await start_harness(plan_for(f"ws://127.0.0.1:{port}/"))
    with trio.fail_after(WAIT):
        async with _connect(harness) as ws:
            with pytest.raises(ConnectionClosed) as caught:
                for _ in range(sent_first + 1):
                    assert await ws.get_message() == "one"
        (finished,) = await harness.wait_finished()
    assert caught.value.reason is not None
    assert (caught.value.reason.code, caught.value.reason.reason) == (1011, "upstream connection lost")
    assert (finished.report.outcome, finished.report.level) == ("upstream_error", "error")


async def test_a_client_that_leaves_closes_the_upstream_at_once(
    realtime: RealtimeUpstream, start_harness: Callable[..., Any]
) -> None:
    harness = await start_harness(plan_for(realtime.url), close_timeout=30.0)
    with trio.fail_after(WAIT):
        client, answer = await RawPeer.connect(harness.port, "/", subprotocols=("realtime",))
        assert isinstance(answer, AcceptConnection)
        session = await realtime.wait_session()
        await client.stream.aclose()  # the tab closed: TCP gone, no close frame
    with trio.fail_after(1.0):
        await session.ended.wait()
        (finished,) = await harness.wait_finished()
    assert session.close is not None and (session.close.code, session.close.reason) == (1001, "client went away")
    assert finished.report.outcome == "client_gone"


async def test_an_idle_session_is_closed_on_both_sides(
    realtime: RealtimeUpstream, start_harness: Callable[..., Any]
) -> None:
    harness = await start_harness(plan_for(realtime.url), idle_timeout=0.3)
    with trio.fail_after(WAIT):
        async with _connect(harness) as ws:
            await ws.get_message()
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
        session = await realtime.wait_session()
        await session.ended.wait()
    assert caught.value.reason is not None
    assert (caught.value.reason.code, caught.value.reason.reason) == (1001, "no message for 0.3 s")
    assert session.close is not None and session.close.code == 1001


async def test_a_busy_session_ends_at_its_maximum_duration(
    realtime: RealtimeUpstream, start_harness: Callable[..., Any]
) -> None:
    harness = await start_harness(plan_for(realtime.url), idle_timeout=0.2, max_session_duration=0.6)
    with trio.fail_after(WAIT):
        async with _connect(harness) as ws:
            await ws.get_message()
            with pytest.raises(ConnectionClosed) as caught:
                while True:  # a message every 0.05 s keeps the idle timeout away
                    await ws.send_message("tick")
                    await ws.get_message()
                    await trio.sleep(0.05)
        (finished,) = await harness.wait_finished()
    assert caught.value.reason is not None and caught.value.reason.code == 1001
    assert finished.report.outcome == "max_duration"
    assert finished.report.from_client.messages >= 5


async def test_a_shutdown_closes_both_sides_with_1001(
    realtime: RealtimeUpstream, start_harness: Callable[..., Any]
) -> None:
    harness = await start_harness(plan_for(realtime.url))
    with trio.fail_after(WAIT):
        async with _connect(harness) as ws:
            await ws.get_message()
            harness.scope.cancel()
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
        session = await realtime.wait_session()
        await session.ended.wait()
    assert caught.value.reason is not None
    assert (caught.value.reason.code, caught.value.reason.reason) == (1001, "server shutting down")
    assert session.close is not None and session.close.code == 1001


# --- failures before the upgrade: an HTTP answer, nothing half-open ---------------------------------


async def _refused(harness: SessionHarness) -> ConnectionRejected:
    with pytest.raises(ConnectionRejected) as caught:
        async with _connect(harness):
            pass
    return caught.value


async def test_the_ssrf_guard_refuses_a_private_upstream_before_connecting(
    realtime: RealtimeUpstream, start_harness: Callable[..., Any]
) -> None:
    harness = await start_harness(plan_for(realtime.url, allow_private=False))
    with trio.fail_after(WAIT):
        refused = await _refused(harness)
    assert refused.status_code == 403
    assert json.loads(refused.body or b"")["error"]["code"] == "upstream_address_refused"
    assert realtime.handshakes == []


async def test_an_upstream_refusal_is_a_502_without_the_upstreams_body(
    realtime: RealtimeUpstream, start_harness: Callable[..., Any]
) -> None:
    harness = await start_harness(plan_for(realtime.url, key="sk-wrong-key-9876"))
    with trio.fail_after(WAIT):
        refused = await _refused(harness)
    assert refused.status_code == 502
    body = json.loads(refused.body or b"")["error"]
    assert body["code"] == "upstream_websocket_refused"
    assert "401" in body["message"] and "9876" not in (refused.body or b"").decode()
    assert len(realtime.handshakes) == 1 and realtime.sessions == []


@pytest.mark.parametrize("how", ["close", "bad_answer", "reject_with_body"])
async def test_a_broken_upstream_handshake_fails_fast(
    start_harness: Callable[..., Any], nursery: trio.Nursery, how: str
) -> None:
    async def misbehave(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        if how == "bad_answer":
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: wrong\r\n\r\n"
            )
            await trio.sleep_forever()
        elif how == "reject_with_body":
            peer = RawPeer(stream, wsproto.ConnectionType.SERVER)
            peer.ws.receive_data(b"")  # state only; the request was read above
            await stream.send_all(b"HTTP/1.1 503 Busy\r\ncontent-length: 4\r\n\r\nbusy")
            await trio.sleep_forever()
        await stream.aclose()

    port = await nursery.start(raw_server, misbehave)
    harness = await start_harness(plan_for(f"ws://127.0.0.1:{port}/"), handshake_timeout=30.0)
    with trio.fail_after(2.0):  # well before the handshake timeout
        refused = await _refused(harness)
    assert refused.status_code == 502
    code = json.loads(refused.body or b"")["error"]["code"]
    assert code == ("upstream_websocket_refused" if how == "reject_with_body" else "upstream_protocol_error")


async def test_an_upstream_that_never_answers_the_handshake_times_out(
    start_harness: Callable[..., Any], nursery: trio.Nursery
) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    port = await nursery.start(raw_server, silent)
    harness = await start_harness(plan_for(f"ws://127.0.0.1:{port}/"), handshake_timeout=0.3)
    with trio.fail_after(WAIT):
        refused = await _refused(harness)
    assert refused.status_code == 504
    assert "within 0.3 s" in json.loads(refused.body or b"")["error"]["message"]


async def test_an_unreachable_upstream_is_a_502(start_harness: Callable[..., Any]) -> None:
    harness = await start_harness(plan_for(f"ws://127.0.0.1:{free_port()}/"))  # nobody listens there
    with trio.fail_after(WAIT):
        refused = await _refused(harness)
    assert refused.status_code == 502
    assert json.loads(refused.body or b"")["error"]["code"] == "upstream_connect_failed"


async def test_a_wss_upstream_is_reached_over_verified_tls(
    start_harness: Callable[..., Any], nursery: trio.Nursery, tmp_path: Path
) -> None:
    server_tls, client_tls = self_signed(tmp_path)
    upstream = await nursery.start(RealtimeUpstream(echo, ssl_context=server_tls).serve)
    harness = await start_harness(plan_for(upstream.url), ssl_context=client_tls)
    with trio.fail_after(WAIT):
        async with _connect(harness) as ws:
            await ws.send_message("over tls")
            assert await ws.get_message() == "over tls"
    assert upstream.sessions[0].headers["authorization"] == "Bearer sk-upstream-key"


async def test_a_wss_upstream_with_an_untrusted_certificate_is_refused(
    start_harness: Callable[..., Any], nursery: trio.Nursery, tmp_path: Path
) -> None:
    server_tls, _ = self_signed(tmp_path)
    upstream = await nursery.start(RealtimeUpstream(echo, ssl_context=server_tls).serve)
    harness = await start_harness(plan_for(upstream.url))  # the system's trust store only
    with trio.fail_after(WAIT):
        refused = await _refused(harness)
    assert refused.status_code == 502
    error = json.loads(refused.body or b"")["error"]
    assert error["code"] == "upstream_connect_failed" and "TLS" in error["message"]
    assert upstream.sessions == []


# --- issue 19: bytes, fragments, the upstream's own close -------------------------------------------


async def test_the_message_limit_counts_utf8_bytes_both_ways(
    start_harness: Callable[..., Any], nursery: trio.Nursery
) -> None:
    """30,000 three-byte characters are 90,000 bytes: above a 65,536-byte limit either way."""
    wide = "€" * 30000

    async def send_wide(session: UpstreamSession) -> None:
        await session.ws.send_message(wide)
        await session.receive()

    upstream = await nursery.start(RealtimeUpstream(send_wide).serve)
    harness = await start_harness(plan_for(upstream.url), max_message_size=65536)
    with trio.fail_after(WAIT):
        async with _connect(harness) as ws:
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
    assert caught.value.reason is not None and caught.value.reason.code == 1009
    assert "upstream sent a message above 65536 bytes" in (caught.value.reason.reason or "")

    upstream = await nursery.start(RealtimeUpstream(echo).serve)
    harness = await start_harness(plan_for(upstream.url), max_message_size=65536)
    with trio.fail_after(WAIT):
        async with _connect(harness) as ws:
            await ws.send_message(wide)
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
        session = await upstream.wait_session()
        await session.ended.wait()
        (finished,) = await harness.wait_finished()
    assert caught.value.reason is not None and caught.value.reason.code == 1009
    assert session.received == [] and finished.report.outcome == "message_too_big"
    assert session.close is not None and session.close.reason == "client sent a message above 65536 bytes"


async def _fragments(harness: SessionHarness, frames: list[Message]) -> tuple[Any, Any]:
    """A hostile raw client: the handshake, then ``frames`` in one write; the close it gets."""
    client, answer = await RawPeer.connect(harness.port, "/", subprotocols=("realtime",))
    async with client.stream:
        assert isinstance(answer, AcceptConnection)
        await client.send(*frames)
        while True:
            got = await client.next_event()
            if got is None or isinstance(got, CloseConnection):
                break
    (finished,) = await harness.wait_finished()
    return got, finished


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([BytesMessage(b"ab", message_finished=False)] * 20000, id="tiny fragments"),
        pytest.param([TextMessage("", message_finished=False)] * 20000, id="empty continuation frames"),
    ],
)
async def test_a_message_in_too_many_fragments_is_closed_with_1009_and_never_buffered_past_the_bound(
    realtime: RealtimeUpstream, start_harness: Callable[..., Any], frames: list[Message]
) -> None:
    harness = await start_harness(plan_for(realtime.url), max_message_size=65536, max_message_frames=256)
    with trio.fail_after(WAIT * 2):
        close, finished = await _fragments(harness, frames)
        session = await realtime.wait_session()
        await session.ended.wait()
    assert isinstance(close, CloseConnection) and close.code == 1009
    assert close.reason == "message in more than 256 frames"
    assert finished.report.outcome == "message_too_big" and session.received == []
    # What one unfinished message held at once: at most its 256 frames' payload, never 20,000 fragments.
    assert finished.report.from_client.peak_buffered <= 256 * 2


async def test_fragments_within_the_bounds_still_arrive_whole_and_count_their_bytes(
    start_harness: Callable[..., Any], nursery: trio.Nursery
) -> None:
    upstream = await nursery.start(RealtimeUpstream(echo).serve)
    harness = await start_harness(plan_for(upstream.url), max_message_size=2048, max_message_frames=256)
    with trio.fail_after(WAIT):
        client, answer = await RawPeer.connect(harness.port, "/", subprotocols=("realtime",))
        async with client.stream:
            assert isinstance(answer, AcceptConnection)
            await client.send(*[TextMessage("é" * 4, message_finished=False)] * 200, TextMessage("!"))
            session = await upstream.wait_session()
            assert await session.wait_received(1) == ["é" * 800 + "!"]
            # 1,601 bytes in 201 frames passed; the same in 257 frames, or 2,049 bytes, would not
            await client.send(*[BytesMessage(b"x" * 8, message_finished=False)] * 256, BytesMessage(b"y"))
            got = await client.next_event()
    assert isinstance(got, CloseConnection) and got.code == 1009
    (finished,) = await harness.wait_finished()
    assert finished.report.from_client.peak_buffered == 2048  # the second message's 256 frames, then refused


async def test_an_upstreams_own_1009_reaches_the_client_with_its_code_and_reason(
    start_harness: Callable[..., Any], nursery: trio.Nursery
) -> None:
    """The client's message was too big for the upstream, not for Parkway: the client learns the upstream's words."""

    async def small_limit(session: UpstreamSession) -> None:
        await session.receive()
        await session.ws.aclose(1009, "Exceeded maximum message size: 1000 bytes")

    upstream = await nursery.start(RealtimeUpstream(small_limit).serve)
    harness = await start_harness(plan_for(upstream.url))
    with trio.fail_after(WAIT):
        async with _connect(harness) as ws:
            await ws.send_message("x" * 2000)
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
        (finished,) = await harness.wait_finished()
    assert caught.value.reason is not None
    assert (caught.value.reason.code, caught.value.reason.reason) == (1009, "Exceeded maximum message size: 1000 bytes")
    assert finished.report.outcome == "ok" and finished.report.closed_by == "upstream"


async def test_the_tls_context_is_built_when_first_needed_and_a_parkway_shares_its_upstreams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loading the system's certificates costs tens of milliseconds: not at every start or Gateway,
    only once a wss:// upstream is opened; a Parkway's sessions check certificates as its upstreams do."""
    built: list[ssl.SSLContext] = []
    real = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(ssl, "create_default_context", counted)
    proxy = WebSocketProxy(WebSocketConfig())
    assert built == []
    assert proxy.ssl_context is proxy.ssl_context is built[0]
    parkway = Parkway(make_config())
    assert parkway.websockets.ssl_context is parkway.upstream.ssl_context
