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


class Waits(list[int]):
    """The reader's waits on its socket (trio.lowlevel.wait_readable), and an Event set at the first."""

    def __init__(self) -> None:
        super().__init__()
        self.begun = trio.Event()


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> Waits:
    counted = Waits()
    wait = trio.lowlevel.wait_readable

    async def counting(fd: Any) -> None:
        counted.append(fd)
        counted.begun.set()
        await wait(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting)
    return counted


async def read_into(got: list[Any], reader: HeadReader) -> None:
    got.append(await reader.read())


@pytest.mark.parametrize("turns", [0, 1, 3])
async def test_an_answer_within_a_few_turns_is_read_without_waiting_on_the_socket(
    pair: tuple[UpstreamConnection, socket.socket], waits: Waits, monkeypatch: pytest.MonkeyPatch, turns: int
) -> None:
    monkeypatch.setattr(response_module, "SPIN", 30.0)  # generous: a loaded machine's turns are slow
    conn, upstream = pair
    got: list[Any] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_into, got, HeadReader(conn, "GET", 5.0, None))
            for _ in range(turns):
                await trio.sleep(0)
            upstream.send(ANSWER)
    assert got[0].status == 200 and got[0].initial == b"{}"
    assert waits == []


async def test_a_later_answer_is_waited_for_after_the_window(
    pair: tuple[UpstreamConnection, socket.socket], waits: Waits, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, upstream = pair
    reads = 0
    receive = UpstreamConnection.recv_nowait

    def counting(self: UpstreamConnection) -> bytes | None:
        nonlocal reads
        reads += 1
        return receive(self)

    monkeypatch.setattr(UpstreamConnection, "recv_nowait", counting)
    got: list[Any] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_into, got, HeadReader(conn, "GET", 5.0, None))
            await waits.begun.wait()  # no answer: past the window the reader waits on the socket
            assert waits == [conn.fd]
            upstream.send(ANSWER)
    assert got[0].status == 200
    # It yielded for SPIN (50 µs) and then waited, not until the answer: a few reads, then the
    # wait, then the answer's.
    assert reads < 200
