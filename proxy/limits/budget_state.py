"""Where budgets are kept: this process's memory, or Redis shared by many (``[state] backend``).

The gateway talks to a :class:`BudgetStore`: ``reserve`` holds a request's worst case in every
budget that applies, or in none; ``settle`` replaces the hold by the charge. The Redis store
(:mod:`proxy.limits.budget_redis`) does each in one Lua script and gives holds a lease, so the
holds of a process that died expire; in memory they die with the process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Protocol

from ..config import StateConfig
from .budget import Applied, BudgetLedger, Level, Reservation


class BudgetStore(Protocol):
    async def reserve(self, budgets: Sequence[Applied], hold_id: str) -> Reservation:
        """Hold each budget's ``hold`` if every one has room (``spent + held + hold <= limit``),
        else hold nothing. With Redis unreachable: 503 (closed) or an unenforced admission (open)."""

    async def settle(self, budgets: Sequence[Applied], hold_id: str, amounts: Sequence[int]) -> bool:
        """Drop the hold and add ``amounts`` to spent; False when the charge could not be recorded."""

    async def levels(self, keys: Sequence[str]) -> list[Level]:
        """Spent and live held amounts of budget windows, for ``parkway budget show``."""


class MemoryBudgets:
    """Budgets in this process's memory (:class:`~proxy.limits.budget.BudgetLedger`)."""

    def __init__(self, clock: Callable[[], datetime], max_windows: int = 100_000):
        self.clock = clock
        self.ledger = BudgetLedger(max_windows)

    async def reserve(self, budgets: Sequence[Applied], hold_id: str) -> Reservation:
        return self.ledger.reserve(budgets, hold_id, self.clock().timestamp())

    async def settle(self, budgets: Sequence[Applied], hold_id: str, amounts: Sequence[int]) -> bool:
        self.ledger.settle(budgets, hold_id, amounts, self.clock().timestamp())
        return True

    async def levels(self, keys: Sequence[str]) -> list[Level]:
        now = self.clock().timestamp()
        return [self.ledger.level(key, now) for key in keys]


@asynccontextmanager
async def open_budgets(config: StateConfig, clock: Callable[[], datetime]) -> AsyncIterator[BudgetStore]:
    """The configured store, open for the duration of the ``async with``."""
    if config.backend == "memory":
        yield MemoryBudgets(clock, config.max_keys)
        return
    from .budget_redis import RedisBudgets  # coredis is only imported when Redis is configured

    async with RedisBudgets(
        config.url,
        key_prefix=config.key_prefix,
        failure_policy=config.failure_policy,
        timeout=config.timeout,
        retry_interval=config.retry_interval,
        lease_ttl=config.lease_ttl,
    ) as store:
        yield store
