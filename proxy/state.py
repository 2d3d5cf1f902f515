"""Where limits and single-use signatures live: this process's memory, or Redis shared by many.

The handler talks to a :class:`StateBackend` and never knows which one it has:

* :class:`MemoryState` (the default) wraps :mod:`proxy.limits`; each Parkway process enforces
  its own limits.
* :class:`~proxy.state_redis.RedisState` keeps them in Redis, so every process and machine
  enforces one limit and one single-use set. When Redis cannot be reached it follows
  ``failure_policy``: ``"open"`` serves without limits, ``"closed"`` refuses with 503; either
  way it logs once per outage and tries Redis again every ``retry_interval`` seconds.

Both are async context managers: ``async with open_state(config.state) as state: ...``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .errors import Overloaded
from .limits import Decision, Lease, LimitKey, Limiter, SeenSignatures

BACKENDS = ("memory", "redis")
FAILURE_POLICIES = ("open", "closed")


@dataclass(frozen=True, slots=True)
class StateConfig:
    """The ``[state]`` section."""

    backend: str = "memory"  # memory | redis
    url: str = "redis://127.0.0.1:6379/0"  # redis:// or rediss://; a password may come from ${ENV}
    key_prefix: str = "parkway:"  # several Parkway deployments can share one Redis
    failure_policy: str = "open"  # when Redis is unreachable: open (serve unlimited) | closed (503)
    timeout: float = 0.25  # seconds for one Redis operation, connecting included
    retry_interval: float = 1.0  # while Redis is down, try it again at most this often
    lease_ttl: float = 60.0  # a concurrency slot of a crashed process is freed after this
    max_keys: int = 100_000  # memory backend: rate/concurrency keys kept (LRU beyond)
    max_signatures: int = 100_000  # memory backend: live single-use signatures remembered
    concurrency_retry_after: float = 1.0  # Retry-After for a concurrency refusal (no better guess exists)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}")
        if self.failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"failure_policy must be one of {', '.join(FAILURE_POLICIES)}")


@runtime_checkable
class StateBackend(Protocol):
    async def acquire(self, keys: Sequence[LimitKey], now: float) -> Decision:
        """Check and count one request against ``keys``; a refusal takes nothing.
        ``now`` is a monotonic time in seconds (the Redis backend uses Redis's clock instead)."""

    async def release(self, lease: Lease | None) -> None:
        """Give back the concurrency slots of an allowed request; never raises, never blocks long."""

    async def check_and_add_signature(self, signature: str, expires_at: float, now: float) -> bool:
        """True on the first use of a single-use URL's ``signature``; both times are UNIX seconds."""

    def healthy(self) -> bool:
        """False while a shared store is unreachable (for readiness checks and metrics)."""

    async def probe(self) -> bool:
        """Ask the store now (bounded by its timeout) and return :meth:`healthy`: /readyz must
        notice an outage, and a recovery, without waiting for request traffic."""


class MemoryState:
    """Limits and single-use signatures in this process's memory."""

    def __init__(self, *, max_keys: int = 100_000, max_signatures: int = 100_000, concurrency_retry_after: float = 1.0):
        self.limiter = Limiter(max_keys=max_keys, concurrency_retry_after=concurrency_retry_after)
        self.signatures = SeenSignatures(max_signatures)

    async def __aenter__(self) -> MemoryState:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def acquire(self, keys: Sequence[LimitKey], now: float) -> Decision:
        return self.limiter.acquire_nowait(keys, now)

    async def release(self, lease: Lease | None) -> None:
        self.limiter.release(lease)

    async def check_and_add_signature(self, signature: str, expires_at: float, now: float) -> bool:
        return self.signatures.check_and_add(signature, expires_at, now)

    def healthy(self) -> bool:
        return True

    async def probe(self) -> bool:
        return True


# --- outages of a shared store (pure) -------------------------------------------------------------


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


def unavailable(policy: str, retry_interval: float) -> Overloaded:
    """The 503 of failure_policy = "closed"."""
    retry = max(1, math.ceil(retry_interval))
    return Overloaded(
        f"shared limit state (Redis) is unreachable and failure_policy is 'closed'; retry after {retry} s",
        code="state_unavailable",
        retry_after=retry,
    )


@asynccontextmanager
async def open_state(config: StateConfig = StateConfig()) -> AsyncIterator[StateBackend]:
    """The configured backend, open for the duration of the ``async with``."""
    if config.backend == "memory":
        yield MemoryState(
            max_keys=config.max_keys,
            max_signatures=config.max_signatures,
            concurrency_retry_after=config.concurrency_retry_after,
        )
        return
    from .state_redis import RedisState  # coredis is only imported when Redis is configured

    async with RedisState(
        config.url,
        key_prefix=config.key_prefix,
        failure_policy=config.failure_policy,
        timeout=config.timeout,
        retry_interval=config.retry_interval,
        lease_ttl=config.lease_ttl,
        concurrency_retry_after=config.concurrency_retry_after,
    ) as state:
        yield state
