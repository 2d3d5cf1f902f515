"""The coarse deadlines of proxy.sweep: a scope in the table is cancelled within a tick after its
deadline passes, never before, and not at all once its owner took it out."""

from __future__ import annotations

import math

import pytest
import trio

from proxy.sweep import FIRED, MAX_TICK, MIN_TICK, Sweep, tick_for


def test_the_tick_is_an_eighth_of_the_shortest_limit_within_its_bounds():
    assert tick_for(10.0, 75.0) == MAX_TICK
    assert tick_for(0.4, 75.0) == 0.05
    assert tick_for(120.0, 2.0) == 0.25
    assert tick_for(0.002) == MIN_TICK
    assert tick_for() == tick_for(0.0) == MAX_TICK  # no limit (or none above 0): the longest tick


@pytest.mark.parametrize("limit", [0.05, 0.4, 5.0, 30.0])
async def test_a_scope_past_its_deadline_is_cancelled_within_a_tick_and_never_before(autojump_clock, nursery, limit):
    sweep = Sweep(lambda: tick_for(limit))
    await nursery.start(sweep.run)
    await trio.sleep(0.3 * tick_for(limit))  # a deadline entered between two ticks
    with trio.CancelScope() as scope:
        sweep.deadlines[scope] = deadline = sweep.now() + limit
        await trio.sleep_forever()
    fired = trio.current_time()
    assert scope.cancelled_caught
    assert deadline <= fired <= deadline + tick_for(limit)
    assert scope.deadline == math.inf  # no trio deadline was set
    assert sweep.deadlines[scope] == FIRED  # how its owner tells its limit from another cancellation


async def test_a_scope_taken_out_before_its_deadline_is_left_alone(autojump_clock, nursery):
    sweep = Sweep(lambda: tick_for(1.0))
    await nursery.start(sweep.run)
    with trio.CancelScope() as scope:
        sweep.deadlines[scope] = sweep.now() + 1.0
        await trio.sleep(0.5)
        del sweep.deadlines[scope]
        await trio.sleep(5.0)
    assert not scope.cancel_called


async def test_a_sweep_that_never_runs_sets_the_scopes_own_deadlines(autojump_clock):
    sweep = Sweep.on_scopes()
    with trio.CancelScope() as scope:
        sweep.deadlines[scope] = trio.current_time() + 3.0
        assert scope.deadline == pytest.approx(trio.current_time() + 3.0)
        del sweep.deadlines[scope]
        assert scope.deadline == math.inf
        assert sweep.deadlines[scope] == math.inf
        scope.cancel()
        assert sweep.deadlines[scope] == FIRED
    assert not sweep.running
