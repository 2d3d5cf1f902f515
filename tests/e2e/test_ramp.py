"""The ramp on real sockets: a burst of new connections arriving at once, beside a stream
already parked.

The burst and the clock that times the parked stream's events run in a process of their own
(``support/burst_client.py``), so neither shares Parkway's scheduler. The set-ups of a burst
are tasks competing with the relay engine: the listen backlog must hold the burst while few
set-ups at a time are in progress (trio's accept loop takes one connection per turn of the run
loop), so a turn stays short and the parked stream's events keep flowing; and every connection
of the burst gets an answer, the ones over ``max_connections`` the usual 503.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

from support.upstream import SSE_HEADERS, Exchange

CLIENT = Path(__file__).resolve().parents[1] / "support" / "burst_client.py"
TICK = 0.01  # the parked stream's pace


async def burst(port: int, stream: str, target: str, count: int) -> dict:
    result = await trio.run_process(
        [sys.executable, str(CLIENT), "--port", str(port), "--stream", stream, "--burst", target,
         "--count", str(count), "--timeout", "90"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def ticking(released: trio.Event):
    """The parked stream: an event every ``TICK`` until ``released``; every other request a
    small answer at once (the burst)."""

    async def behaviour(ex: Exchange) -> None:
        if "parked" not in ex.request.target:
            await ex.respond(200, [("content-type", "application/json")], b'{"ok":true}')
            return
        await ex.send_head(200, SSE_HEADERS)
        while not released.is_set():
            await ex.send_data(b"data: tick\n\n")
            await trio.sleep(TICK)
        await ex.send_end()

    return behaviour


async def burst_beside_a_parked_stream(parkway, upstream, count: int) -> dict:
    """``count`` new connections at once beside one parked stream; what the burst client saw."""
    released = trio.Event()
    upstream.behaviour = ticking(released)
    try:
        with trio.fail_after(100):
            return await burst(
                parkway.port,
                parkway.sign(f"{upstream.base}/v1/chat?parked"),
                parkway.sign(f"{upstream.base}/v1/chat?burst"),
                count,
            )
    finally:
        released.set()


@pytest.mark.hang_limit(120)
async def test_a_burst_of_new_connections_does_not_stall_a_parked_stream(start_parkway, upstream):
    got = await burst_beside_a_parked_stream(await start_parkway(), upstream, 800)

    assert got["statuses"] == {"200": 800} and got["unanswered"] == 0, got
    # Setting 800 requests up takes this process (Parkway, its upstream, the test) a while; the
    # parked stream's longest wait between two events is a few turns of the run loop, a small
    # part of that. With every queued connection set up at once, a turn holds all 800 set-ups
    # and the stream waits a large part of the burst.
    assert got["events_during"] > 0, got
    assert got["max_gap_s"] < max(0.2 * got["burst_s"], 10 * TICK), got


@pytest.mark.hang_limit(120)
async def test_every_connection_of_a_burst_over_the_cap_gets_an_answer(start_parkway, upstream):
    got = await burst_beside_a_parked_stream(await start_parkway(max_connections=50), upstream, 300)

    # Nothing is lost: each connection gets its answer, 200 or the overload 503, none a bare close.
    assert got["unanswered"] == 0 and "0" not in got["statuses"], got
    assert set(got["statuses"]) <= {"200", "503"} and sum(got["statuses"].values()) == 300, got
    assert got["statuses"].get("200", 0) > 0, got
