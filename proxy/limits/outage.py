"""Outages of a shared state store (Redis), decided without I/O: when to try the store again,
and the refusal of ``failure_policy = "closed"``. Used by :mod:`proxy.limits.redis`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import Overloaded


@dataclass(slots=True)
class Outage:
    """Whether a shared store is down, and whether it is time to try it again.

    While it is down, one attempt per ``retry_interval`` goes through (the first caller after
    the interval claims it); every other request follows the failure policy at once instead of
    waiting for a timeout.
    """

    retry_interval: float
    down_since: float | None = None
    next_attempt: float = 0.0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def claim_attempt(self, now: float) -> bool:
        if self.down_since is None:
            return True
        if now >= self.next_attempt:
            self.next_attempt = now + self.retry_interval
            return True
        return False

    def failed(self, now: float) -> bool:
        """Record a failure; True when it starts an outage (log it then, and only then)."""
        self.next_attempt = now + self.retry_interval
        if self.down_since is None:
            self.down_since = now
            return True
        return False

    def succeeded(self, now: float) -> float | None:
        """Record a success; the outage's length when it ends one, else None."""
        if self.down_since is None:
            return None
        length, self.down_since = now - self.down_since, None
        return length


def unavailable(retry_interval: float) -> Overloaded:
    """The 503 of failure_policy = "closed"."""
    retry = max(1, math.ceil(retry_interval))
    return Overloaded(
        f"shared limit state (Redis) is unreachable and failure_policy is 'closed'; retry after {retry} s",
        code="state_unavailable",
        retry_after=retry,
    )
