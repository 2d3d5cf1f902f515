"""Coarse deadlines for waits that nearly always end long before them: a client's next request
head, an upstream's first byte.

Setting a trio deadline costs a request ~10 Python calls each time (the scope's
``_might_change_registered_deadline`` context manager and the run's deadline heap), and these
waits set and lift one twice per request. A :class:`Sweep` instead holds a table of cancel scope
→ deadline, entered and left with a dict store and a ``del``; one task checks it every tick and
cancels the scopes whose deadline has passed, as the relay engine enforces its idle and write
limits. A limit is then enforced within one tick after it passes (the tick is at most 1 s and an
eighth of the shortest limit, :func:`tick_for`), never before.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import trio

MAX_TICK = 1.0
MIN_TICK = 0.001  # a limit shorter than 8 ms is checked every millisecond, not more often
# What a scope's deadline becomes in the table once the sweep has cancelled it: its owner tells
# its own limit from any other cancellation with one lookup (``cancel_called`` reads the clock).
FIRED = -math.inf


class Cancellable(Protocol):
    """What a table holds: a cancel scope, or anything else a wait can be stopped through
    (a client connection waiting for a head, :meth:`~proxy.http.connection.HTTPConnection.cancel`)."""

    def cancel(self) -> None: ...


def tick_for(*limits: float) -> float:
    """How often to check: an eighth of the shortest limit, within [``MIN_TICK``, ``MAX_TICK``]."""
    return max(MIN_TICK, min((MAX_TICK, *(limit / 8 for limit in limits if limit > 0))))


class _OnScopes(dict[Cancellable, float]):
    """A table whose entries are the scopes' own trio deadlines: for a wait with no sweep running
    (a connection read outside a server). It holds cancel scopes only."""

    def __setitem__(self, scope: Cancellable, deadline: float) -> None:
        assert isinstance(scope, trio.CancelScope)
        scope.deadline = deadline

    def __getitem__(self, scope: Cancellable) -> float:
        assert isinstance(scope, trio.CancelScope)
        return FIRED if scope.cancel_called else scope.deadline

    def __delitem__(self, scope: Cancellable) -> None:
        assert isinstance(scope, trio.CancelScope)
        scope.deadline = math.inf


class Sweep:
    """Cancel scope (or any :class:`Cancellable`) → deadline (on trio's clock, :attr:`now`),
    enforced by :meth:`run` every tick.

    The owner of a wait enters its scope in :attr:`deadlines` (again to move its deadline) and
    deletes it when the wait ends; the sweep only cancels, and marks the scope :data:`FIRED` in
    the table until its owner deletes it. ``tick`` gives the current tick (limits may be reloaded)."""

    __slots__ = ("_tick", "deadlines", "now", "running")

    def __init__(self, tick: Callable[[], float]):
        self._tick = tick
        self.deadlines: dict[Cancellable, float] = {}
        self.now: Callable[[], float] = trio.current_time  # run() binds the run's clock itself (one frame a read)
        self.running = False

    @classmethod
    def on_scopes(cls) -> Sweep:
        """A sweep that never runs: its table sets (and lifts) the scopes' own trio deadlines."""
        sweep = cls(lambda: MAX_TICK)
        sweep.deadlines = _OnScopes()
        return sweep

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Enforce the table until cancelled."""
        self.now = trio.lowlevel.current_clock().current_time
        self.running = True
        try:
            task_status.started()
            while True:
                await trio.sleep(self._tick())
                self.expire(self.now())
        finally:
            self.running = False

    def expire(self, now: float) -> None:
        """Cancel every scope whose deadline is ``now`` or earlier, and mark it :data:`FIRED`."""
        deadlines = self.deadlines
        for scope in [scope for scope, deadline in deadlines.items() if FIRED < deadline <= now]:
            deadlines[scope] = FIRED
            scope.cancel()
