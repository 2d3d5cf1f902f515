"""The global admission gate: in-flight cap, bounded queue, queue timeout (trio, autojump clock)."""

import pytest
import trio
import trio.testing

from proxy.errors import Overloaded
from proxy.limits.admission import GlobalGate

# --- the global gate ----------------------------------------------------------------------------


def test_gate_nowait() -> None:
    gate = GlobalGate(2)
    gate.acquire_nowait()
    gate.acquire_nowait()
    with pytest.raises(Overloaded) as info:
        gate.acquire_nowait()
    assert (info.value.status, info.value.retry_after) == (503, 1)
    assert "2 upstream requests are in flight, the limit is 2" in info.value.message
    gate.release()
    gate.acquire_nowait()
    assert gate.in_flight == 2


def test_gate_without_cap_counts_only() -> None:
    gate = GlobalGate(None)
    for _ in range(1000):
        gate.acquire_nowait()
    assert gate.in_flight == 1000


@pytest.mark.parametrize("kwargs", [dict(max_in_flight=0), dict(max_in_flight=-1)])
def test_gate_refuses_bad_cap(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        GlobalGate(**kwargs)


async def test_gate_refuses_at_once_when_queue_is_off(autojump_clock: trio.testing.MockClock) -> None:
    gate = GlobalGate(1, max_waiting=10)  # no queue_timeout: the queue is off
    await gate.acquire()
    start = trio.current_time()
    with pytest.raises(Overloaded):
        await gate.acquire()
    assert trio.current_time() == start and gate.waiting == 0


async def test_gate_queue_admits_in_order_and_times_out(autojump_clock: trio.testing.MockClock) -> None:
    gate = GlobalGate(1, max_waiting=2, queue_timeout=5.0)
    order: list[str] = []
    refused: list[str] = []

    async def request(name: str, hold: float) -> None:
        try:
            async with gate.slot():
                order.append(name)
                await trio.sleep(hold)
        except Overloaded as exc:
            refused.append(f"{name}: {'waited' if 'waited' in exc.message else 'at once'}")

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, "a", 3.0)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(request, "b", 3.0)  # waits 3 s, then runs
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(request, "c", 1.0)  # waits 5 s and gives up (b holds the slot until 6)
            await trio.testing.wait_all_tasks_blocked()
            assert gate.waiting == 2
            nursery.start_soon(request, "d", 1.0)  # queue full: refused at once
            await trio.testing.wait_all_tasks_blocked()
            assert refused == ["d: at once"]
    assert order == ["a", "b"]
    assert refused == ["d: at once", "c: waited"]
    assert (gate.in_flight, gate.waiting) == (0, 0)


async def test_gate_waiter_beats_newcomer(autojump_clock: trio.testing.MockClock) -> None:
    gate = GlobalGate(1, max_waiting=1, queue_timeout=10.0)
    gate.acquire_nowait()
    admitted = trio.Event()

    async def waiter() -> None:
        await gate.acquire()
        admitted.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            gate.release()  # handed straight to the waiter
            with pytest.raises(Overloaded):
                gate.acquire_nowait()
            await admitted.wait()
    assert gate.in_flight == 1


async def test_gate_cancelled_waiter_leaves_the_queue(autojump_clock: trio.testing.MockClock) -> None:
    gate = GlobalGate(1, max_waiting=1, queue_timeout=10.0)
    gate.acquire_nowait()
    with trio.move_on_after(1.0):
        await gate.acquire()
    assert (gate.waiting, gate.in_flight) == (0, 1)
    gate.release()
    gate.acquire_nowait()


async def test_gate_flood_refuses_and_admitted_streams_finish(autojump_clock: trio.testing.MockClock) -> None:
    """1000 arrivals against 10 slots: 990 refused at once, the 10 streams finish untouched."""
    gate = GlobalGate(10)
    finished, refused = [], []

    async def stream(i: int, started: trio.Event) -> None:
        try:
            async with gate.slot():
                started.set()
                for _ in range(5):  # a slow stream, chunk by chunk
                    await trio.sleep(1.0)
                finished.append(i)
        except Overloaded:
            refused.append(i)
            started.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(1000):
                started = trio.Event()
                nursery.start_soon(stream, i, started)
                await started.wait()
            assert len(refused) == 990 and gate.waiting == 0
    assert sorted(finished) == list(range(10))
    assert gate.in_flight == 0
