"""HeadReader.read: an answer that comes soon after the request is read without waiting on the
socket (the loop never sleeps for it); a later one is waited for, the yielding bounded in time."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from proxy.upstream import response as response_module
from proxy.upstream.connection import UpstreamConnection
from proxy.upstream.response import HeadReader

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


@pytest.fixture
def pair() -> Iterator[tuple[UpstreamConnection, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    yield UpstreamConnection(ours, "upstream.test"), theirs
    ours.close()
    theirs.close()


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The reader's waits on its socket (trio.lowlevel.wait_readable), counted."""
    counted: list[int] = []
    wait = trio.lowlevel.wait_readable

    async def counting(fd: Any) -> None:
        counted.append(fd)
        await wait(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting)
    return counted


@pytest.mark.parametrize("turns", [0, 1, 3])
async def test_an_answer_within_a_few_turns_is_read_without_waiting_on_the_socket(
    pair: tuple[UpstreamConnection, socket.socket], waits: list[int], monkeypatch: pytest.MonkeyPatch, turns: int
) -> None:
    monkeypatch.setattr(response_module, "SPIN", 30.0)  # generous: a loaded machine's turns are slow
    conn, upstream = pair
    reader = HeadReader(conn, "GET", 5.0, None)
    got: list[Any] = []

    async def read() -> None:
        got.append(await reader.read())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            for _ in range(turns):
                await trio.sleep(0)
            upstream.send(ANSWER)
    assert got[0].status == 200 and got[0].initial == b"{}"
    assert waits == []


async def test_a_later_answer_is_waited_for_after_the_window(
    pair: tuple[UpstreamConnection, socket.socket], waits: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, upstream = pair
    reads = 0
    receive = UpstreamConnection.recv_nowait

    def counting(self: UpstreamConnection) -> bytes | None:
        nonlocal reads
        reads += 1
        return receive(self)

    monkeypatch.setattr(UpstreamConnection, "recv_nowait", counting)
    reader = HeadReader(conn, "GET", 5.0, None)
    got: list[Any] = []

    async def read() -> None:
        got.append(await reader.read())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.sleep(0.05)  # far past the window: the reader must be waiting on the socket
            assert waits == [conn.fd]
            upstream.send(ANSWER)
    assert got[0].status == 200
    # Yielding lasted SPIN (50 µs), not the 50 ms: a few reads, then the wait, then the answer's.
    assert reads < 200
