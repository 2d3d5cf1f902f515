"""Run ``parkway`` with its run loop's turns and its set-ups timed: where a ramp's first events wait.

``python -m loadtest.turns serve --config FILE`` is ``parkway serve --config FILE`` with a trio
instrument timing every turn of the run loop (running each runnable task once, between two
waits for I/O: the longest a woken task, the relay engine's included, waits) and counting its
task steps, and with each connection's set-up timed from its accept to its first relay start
(the moment its stream joins the relay engine). At exit it writes both to ``$TURNS_OUT``
(JSON). The runner (``--profile turns``) summarises them over the burst: a time to first
event much longer than the set-up inside Parkway is a wait in the listen backlog, i.e. CPU
capacity rather than scheduling.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import os
import sys
import time
from typing import Any

import trio

_started = contextvars.ContextVar[float | None]("setup_started", default=None)
_origin = time.perf_counter()
turns: list[tuple[float, float, int]] = []  # (end, seconds, task steps) of turns with a step
setups: list[tuple[float, float]] = []  # (accepted at, seconds to the relay start)


class TurnTimer(trio.abc.Instrument):
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0

    def after_io_wait(self, timeout: float) -> None:
        self.start = time.perf_counter()
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def before_io_wait(self, timeout: float) -> None:
        if self.steps:
            now = time.perf_counter()
            turns.append((now - _origin, now - self.start, self.steps))


def _patch() -> None:
    from proxy.http.server import Server
    from proxy.relay.engine import EpollEngine

    connection_task = Server._connection_task
    follow = EpollEngine.follow  # where a stream joins the engine (the pump calls it, not relay)

    async def timed_connection(self: Server, *args: Any, **kwargs: Any) -> None:
        _started.set(time.perf_counter())
        await connection_task(self, *args, **kwargs)

    async def timed_follow(self: EpollEngine, *args: Any, **kwargs: Any) -> None:
        started = _started.get()
        if started is not None:  # a connection's first relayed response
            setups.append((started - _origin, time.perf_counter() - started))
            _started.set(None)
        await follow(self, *args, **kwargs)

    Server._connection_task = timed_connection  # type: ignore[method-assign]
    EpollEngine.follow = timed_follow  # type: ignore[method-assign]

    run = trio.run

    def instrumented(*args: Any, **kwargs: Any) -> Any:
        kwargs["instruments"] = [*kwargs.get("instruments", ()), TurnTimer()]
        return run(*args, **kwargs)

    trio.run = instrumented


def _write() -> None:
    with open(os.environ.get("TURNS_OUT", "turns.json"), "w") as file:
        json.dump({"turns": turns, "setups": setups}, file)


def summarise(data: dict[str, Any]) -> dict[str, float | None]:
    """Set-up inside Parkway and turn lengths over the burst (first accept to last relay start)."""
    setup = data.get("setups") or []
    if not setup:
        return {}
    start = min(t for t, _ in setup)
    end = max(t + d for t, d in setup)
    window = [(d, n) for t, d, n in data.get("turns") or [] if start <= t <= end]

    def at(values: list[float], q: float) -> float | None:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    ms = [d * 1000 for _, d in setup]
    turn_ms = [d * 1000 for d, _ in window]
    return {
        "setup_in_proxy_p50_ms": at(ms, 0.5),
        "setup_in_proxy_p99_ms": at(ms, 0.99),
        "turn_p50_ms": at(turn_ms, 0.5),
        "turn_p99_ms": at(turn_ms, 0.99),
        "turn_max_ms": max(turn_ms, default=None),
        "turn_steps_p99": at([float(n) for _, n in window], 0.99),
        "busy_fraction": sum(d for d, _ in window) / (end - start) if end > start else None,
    }


def main() -> int:
    _patch()
    atexit.register(_write)
    from proxy.cli import main as parkway

    return parkway(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
