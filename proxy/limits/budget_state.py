"""Where budgets are kept: this process's memory, or Redis shared by many (``[state] backend``).

The gateway talks to a :class:`BudgetStore`: ``reserve`` holds a request's worst case in every
budget that applies, or in none; ``settle`` replaces the hold by the charge. The Redis store
(:mod:`proxy.limits.budget_redis`) does each in one Lua script and gives holds a lease, so the
holds of a process that died expire; in memory they die with the process.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Protocol

from ..config import Config, StateConfig
from .budget import (
    CREDENTIAL,
    USER,
    Applied,
    BudgetLedger,
    BudgetSpec,
    Level,
    Reservation,
    Settlement,
    budget_key,
    window,
)


class BudgetStore(Protocol):
    ledger: str  # names where holds and charges live: a job settled elsewhere is charged in full

    async def reserve(self, budgets: Sequence[Applied], hold_id: str) -> Reservation:
        """Hold each budget's ``hold`` if every one has room (``spent + held + hold <= limit``),
        else hold nothing. With Redis unreachable: 503 (closed) or an unenforced admission (open)."""

    async def settle(self, budgets: Sequence[Applied], hold_id: str, amounts: Sequence[int]) -> Settlement:
        """Drop the hold and add ``amounts`` to spent: RECORDED, NOT_RECORDED (never sent: the hold
        stays until its lease ends), or UNKNOWN (sent to a store that did not answer: it may
        still be recorded when the store answers)."""

    async def levels(self, keys: Sequence[str]) -> list[Level]:
        """Spent and live held amounts of budget windows, for ``parkway budget show``."""


class MemoryBudgets:
    """Budgets in this process's memory (:class:`~proxy.limits.budget.BudgetLedger`)."""

    def __init__(self, clock: Callable[[], datetime], max_windows: int = 100_000):
        self.clock = clock
        self.ledger = f"memory:{secrets.token_hex(8)}"  # this process's, gone with it
        self.book = BudgetLedger(max_windows)

    async def reserve(self, budgets: Sequence[Applied], hold_id: str) -> Reservation:
        return self.book.reserve(budgets, hold_id, self.clock().timestamp())

    async def settle(self, budgets: Sequence[Applied], hold_id: str, amounts: Sequence[int]) -> Settlement:
        self.book.settle(budgets, hold_id, amounts, self.clock().timestamp())
        return Settlement.RECORDED

    async def levels(self, keys: Sequence[str]) -> list[Level]:
        now = self.clock().timestamp()
        return [self.book.level(key, now) for key in keys]


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


async def budget_report(config: Config, credential_id: str, user: str | None, now: datetime) -> list[str]:
    """``parkway budget show``: spent, held and remaining of each budget of a credential (and
    user), in their current windows, from the configured shared store. Raises ValueError with
    the reason when there is nothing to show."""
    credential = config.credential(credential_id)
    if credential is None:
        raise ValueError(f"no credential {credential_id!r} in the configuration")
    wanted: list[tuple[str, str | None, BudgetSpec | None]] = [(CREDENTIAL, None, credential.budget)]
    if user is not None:
        wanted.append((USER, user, credential.user_budget))
    chosen = [(scope, who, spec) for scope, who, spec in wanted if spec is not None]
    if not chosen:
        raise ValueError(f"credential {credential_id!r} has no {'user_budget' if user else 'budget'}")
    if config.state.backend != "redis":
        raise ValueError("[state] backend is memory: each Parkway process keeps its own budgets; nothing is shared")
    keys = [budget_key(scope, credential.id, who, spec, now) for scope, who, spec in chosen]
    async with open_budgets(config.state, lambda: now) as store:
        levels = await store.levels(keys)
    lines = []
    for (scope, _who, spec), level in zip(chosen, levels, strict=True):
        start, end = window(spec.per, now)
        left = max(0, spec.limit - level.spent - level.held)
        lines.append(
            f"{scope}-{spec.per}: limit {spec.shown()}, spent {spec.shown(level.spent)}, held {spec.shown(level.held)}, "
            f"remaining {spec.shown(left)}; window {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
        )
    return lines
