"""Where limits and single-use signatures live: this process's memory, or Redis shared by many.

The handler talks to a :class:`StateBackend` and never knows which one it has:

* :class:`MemoryState` (the default) wraps :mod:`proxy.limits.limiter`; each Parkway process enforces
  its own limits.
* :class:`~proxy.limits.redis.RedisState` keeps them in Redis, so every process and machine
  enforces one limit and one single-use set. When Redis cannot be reached it follows
  ``failure_policy``: ``"open"`` serves without limits, ``"closed"`` refuses with 503; either
  way it logs once per outage and tries Redis again every ``retry_interval`` seconds.

Both are async context managers: ``async with open_state(config.state) as state: ...``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol, runtime_checkable

from ..config import StateConfig
from .limiter import Decision, Lease, Limiter, LimitKey, SeenSignatures

DEFAULT_STATE = StateConfig()  # memory


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


@asynccontextmanager
async def open_state(config: StateConfig = DEFAULT_STATE) -> AsyncIterator[StateBackend]:
    """The configured backend, open for the duration of the ``async with``."""
    if config.backend == "memory":
        yield MemoryState(
            max_keys=config.max_keys,
            max_signatures=config.max_signatures,
            concurrency_retry_after=config.concurrency_retry_after,
        )
        return
    from .redis import RedisState  # coredis is only imported when Redis is configured

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
