"""proxy.upstream.connection: sending while watching the peer (issue 18, harm 5), on a socket pair."""

from __future__ import annotations

import socket

import trio

from proxy.upstream.connection import UpstreamConnection


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
