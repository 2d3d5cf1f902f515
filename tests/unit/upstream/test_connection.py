"""proxy.upstream.connection: sending while watching the peer (issue 18, harm 5), on a socket pair;
connecting (the timeout, the next address, the address check, the pool check's poll object), on 127.0.0.1."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from proxy.errors import Forbidden, UpstreamConnectError, UpstreamTimeout
from proxy.upstream.connection import UpstreamConnection
from proxy.upstream.ssrf import AddressPolicy


async def test_a_full_socket_stops_the_send_when_the_peer_answers() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    conn = UpstreamConnection(ours, "upstream.test")
    body = b"x" * (8 << 20)  # far more than the socket pair's buffers: the peer never reads it

    theirs.send(b"HTTP/1.1 413 Payload Too Large\r\n\r\n")  # an answer already waiting: seen once the socket is full
    try:
        with trio.fail_after(5):
            left = await conn.send_sealed(body, watch=True)
        assert 0 < len(left) < len(body)  # stopped part way: the rest is the caller's to drop
        assert conn.sent == len(body) - len(left)
        assert conn.recv_nowait() == b"HTTP/1.1 413 Payload Too Large\r\n\r\n"
    finally:
        conn.close()
        theirs.close()


async def test_without_watching_everything_goes() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    conn = UpstreamConnection(ours, "upstream.test")
    body = b"y" * (1 << 20)
    received = bytearray()

    async def read_all() -> None:
        theirs.setblocking(False)
        while len(received) < len(body):
            await trio.lowlevel.wait_readable(theirs)
            received.extend(theirs.recv(1 << 16))

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                assert len(await conn.send_sealed(body)) == 0
        assert bytes(received) == body and conn.sent == len(body)
    finally:
        conn.close()
        theirs.close()


async def test_an_idle_connection_with_anything_to_read_is_not_reused() -> None:
    # What the pool asks before reuse (issue 10: stray bytes never answer another request).
    for what in ("bytes", "close", "reset"):
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        conn = UpstreamConnection(ours, "upstream.test")
        assert not conn.has_unexpected_bytes()
        if what == "bytes":
            theirs.send(b"HTTP/1.1 200 OK\r\n\r\n")
        elif what == "close":
            theirs.close()
        else:
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            theirs.close()
        assert conn.has_unexpected_bytes(), what
        assert conn.has_unexpected_bytes(), what  # asking again changes nothing (nothing was read)
        conn.close()
        theirs.close()


# --- connecting: real sockets on 127.0.0.1 --------------------------------------------------------


def _listener(backlog: int = 64) -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock, sock.getsockname()[1]


def _closed_port() -> int:
    sock, port = _listener()
    sock.close()
    return port


PRIVATE_OK = AddressPolicy(allow_private=True)


async def test_a_fresh_connection_is_connected_and_checked_for_stray_bytes() -> None:
    listener, port = _listener()
    try:
        with trio.fail_after(10):
            conn = await UpstreamConnection.connect("127.0.0.1", port, policy=PRIVATE_OK, ssl_context=None, timeout=5)
        theirs, _ = listener.accept()
        try:
            assert conn.sock.gettimeout() == 0.0  # non-blocking, as the relay needs it
            assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            # The poll object the connect used is the pool's check now: for reading only.
            assert not conn.has_unexpected_bytes()
            theirs.send(b"HTTP/1.1 200 OK\r\n\r\n")
            assert conn.has_unexpected_bytes()
            conn.sock.send(b"ping")
            assert theirs.recv(4) == b"ping"
        finally:
            conn.close()
            theirs.close()
    finally:
        listener.close()


async def test_a_refused_address_gives_way_to_the_next_and_all_refused_is_a_connect_error() -> None:
    listener, port = _listener()

    async def both(host: str, port: int) -> list[str]:
        return ["127.0.0.2", "127.0.0.1"]  # nothing listens on 127.0.0.2: refused at once

    try:
        with trio.fail_after(10):
            conn = await UpstreamConnection.connect(
                "dual.test", port, policy=PRIVATE_OK, ssl_context=None, timeout=5, resolver=both
            )
        assert conn.sock.getpeername() == ("127.0.0.1", port)
        conn.close()
        closed = _closed_port()
        for host, resolver in (("127.0.0.1", both), ("dual.test", both)):
            with trio.fail_after(10), pytest.raises(UpstreamConnectError, match=r"\[Errno 111\]"):
                await UpstreamConnection.connect(
                    host, closed, policy=PRIVATE_OK, ssl_context=None, timeout=5, resolver=resolver
                )
    finally:
        listener.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "full.test"])  # a literal (no outer scope), a name
async def test_a_connect_that_does_not_complete_is_bounded_by_the_timeout(host: str) -> None:
    # A listener whose accept queue is full drops further SYNs: the connect stays under way.
    listener, port = _listener(backlog=0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)

        async def loopback(host: str, port: int) -> list[str]:
            return ["127.0.0.1"]

        with trio.fail_after(20):
            start = trio.current_time()
            with pytest.raises(UpstreamTimeout, match=f"connecting to {host}:{port} timed out"):
                await UpstreamConnection.connect(
                    host, port, policy=PRIVATE_OK, ssl_context=None, timeout=0.5, resolver=loopback
                )
            assert trio.current_time() - start >= 0.5
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_a_resolution_that_hangs_is_bounded_by_the_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def hang(host: str, port: int) -> list[str]:
        await trio.sleep_forever()
        raise AssertionError

    start = trio.current_time()
    with pytest.raises(UpstreamTimeout, match="connecting to slow.test:80 timed out"):
        await UpstreamConnection.connect("slow.test", 80, policy=PRIVATE_OK, ssl_context=None, timeout=3, resolver=hang)
    assert trio.current_time() - start == pytest.approx(3.0)


async def test_a_refused_address_is_refused_on_every_connect() -> None:
    # The policy remembers allowed addresses only: loopback stays refused without the flag, each time.
    listener, port = _listener()
    listener.setblocking(False)
    policy = AddressPolicy()
    try:
        for _ in range(3):
            for host in ("127.0.0.1", "[::ffff:127.0.0.1]", "localhost.test"):
                with pytest.raises(Forbidden, match="loopback"):
                    await UpstreamConnection.connect(
                        host, port, policy=policy, ssl_context=None, timeout=5, resolver=_loopback_and_public
                    )
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection was ever made
    finally:
        listener.close()


async def _loopback_and_public(host: str, port: int) -> list[str]:
    return ["93.184.216.34", "127.0.0.1"]  # a mixed answer: refused whole
