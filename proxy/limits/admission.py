"""Admission: the global cap on requests in flight to upstreams, with an optional bounded queue.

The one limit that may wait (for a slot, bounded by ``queue_timeout``), so it lives apart
from the pure arithmetic of :mod:`proxy.limits.limiter`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..errors import Overloaded


class GlobalGate:
    """A cap on requests in flight to upstreams, with an optional short, bounded wait queue.

    With ``max_waiting == 0`` or ``queue_timeout == 0`` (the default) a request past the cap is
    refused at once with 503 and Retry-After; nothing queues and nothing grows. Otherwise up to
    ``max_waiting`` requests wait, first come first served, for at most ``queue_timeout``
    seconds each. Requests already admitted are never disturbed.
    """

    def __init__(
        self,
        max_in_flight: int | None,
        *,
        max_waiting: int = 0,
        queue_timeout: float = 0.0,
        retry_after: int = 1,
    ):
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1 (or None for no cap)")
        self.max_in_flight = max_in_flight
        self.max_waiting = max_waiting if queue_timeout > 0 else 0
        self.queue_timeout = queue_timeout
        self.retry_after = retry_after
        self.in_flight = 0
        self.waiting = 0
        # trio.Semaphore is FIFO-fair: while anyone waits, a newcomer's acquire_nowait fails.
        self._slots = trio.Semaphore(max_in_flight) if max_in_flight is not None else None

    def _overloaded(self, waited: bool) -> Overloaded:
        why = f"{self.in_flight} upstream requests are in flight, the limit is {self.max_in_flight}"
        if waited:
            why += f" (waited {self.queue_timeout:g} s for a slot)"
        return Overloaded(f"server busy: {why}; retry after {self.retry_after} s", retry_after=self.retry_after)

    def acquire_nowait(self) -> None:
        """Take a slot now or raise Overloaded."""
        if self._slots is not None:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                raise self._overloaded(False) from None
        self.in_flight += 1

    async def acquire(self) -> None:
        """Take a slot; wait in the bounded queue if it is on and has room; else raise Overloaded."""
        try:
            self.acquire_nowait()
            return
        except Overloaded:
            if self.waiting >= self.max_waiting:
                raise
        assert self._slots is not None
        self.waiting += 1
        try:
            with trio.move_on_after(self.queue_timeout):
                await self._slots.acquire()
                self.in_flight += 1
                return
        finally:
            self.waiting -= 1
        raise self._overloaded(True)

    def release(self) -> None:
        self.in_flight -= 1
        if self._slots is not None:
            self._slots.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """``async with gate.slot():`` around the upstream exchange."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()
