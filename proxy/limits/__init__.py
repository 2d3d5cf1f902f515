"""Limits: the global admission gate, per-credential and per-user rates and concurrency, single-use
signatures, and where their state lives (memory or Redis). The rest of Parkway imports them from
here, never from the modules inside.

Budgets (docs/budgets.md) too: the pure arithmetic (:mod:`.budget`) and the stores
(:mod:`.budget_state`, :mod:`.budget_redis`).

Importing this package loads no I/O library: the pure names (:mod:`.limiter`, :mod:`.outage`,
:mod:`.budget`) are loaded with it, the ones that need trio or coredis (:mod:`.admission`,
:mod:`.state`, :mod:`.redis`, :mod:`.budget_state`, :mod:`.budget_redis`) on first use. That keeps ``proxy.config`` pure, which reads ``LimitSpec`` and
``parse_rate`` straight from :mod:`.limiter`: the limits' state reads config's ``StateConfig``, so
config sits below this package and going through its face would be an import cycle.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .budget import (
    NOTHING,
    USAGE,
    BudgetTicket,
    Charge,
    JobHold,
    Level,
    RequestCost,
    Settlement,
    amount,
    applied_budgets,
    budget_key,
    charge_for,
    job_settlement,
    rate_limit_headers,
    refusal,
    request_cost,
    session_cap,
    session_charge,
)
from .budget_spec import NANO_USD, USD, BudgetsConfig, BudgetSpec, PriceTable
from .limiter import (
    ALLOWED,
    CONCURRENCY,
    CREDENTIAL,
    RATE,
    USER,
    Decision,
    Lease,
    LimitKey,
    LimitSpec,
    end_user,
    limit_keys,
    parse_rate,
    replay_refusal,
    split_limits,
    wants_single_use,
)
from .outage import Outage

if TYPE_CHECKING:
    from .admission import GlobalGate
    from .budget_redis import RedisBudgets
    from .budget_state import BudgetStore, MemoryBudgets, budget_report, open_budgets
    from .redis import RedisState
    from .state import MemoryState, StateBackend, open_state

_LAZY = {
    "GlobalGate": "admission",
    "MemoryState": "state",
    "StateBackend": "state",
    "open_state": "state",
    "RedisState": "redis",
    "BudgetStore": "budget_state",
    "MemoryBudgets": "budget_state",
    "budget_report": "budget_state",
    "open_budgets": "budget_state",
    "RedisBudgets": "budget_redis",
}

__all__ = [
    "ALLOWED",
    "BudgetSpec",
    "BudgetStore",
    "BudgetTicket",
    "BudgetsConfig",
    "Charge",
    "JobHold",
    "Level",
    "MemoryBudgets",
    "NANO_USD",
    "NOTHING",
    "PriceTable",
    "RedisBudgets",
    "RequestCost",
    "Settlement",
    "USAGE",
    "USD",
    "amount",
    "applied_budgets",
    "budget_key",
    "budget_report",
    "charge_for",
    "job_settlement",
    "open_budgets",
    "rate_limit_headers",
    "refusal",
    "request_cost",
    "session_cap",
    "session_charge",
    "CONCURRENCY",
    "CREDENTIAL",
    "RATE",
    "USER",
    "Decision",
    "GlobalGate",
    "Lease",
    "LimitKey",
    "LimitSpec",
    "MemoryState",
    "Outage",
    "RedisState",
    "StateBackend",
    "end_user",
    "limit_keys",
    "open_state",
    "parse_rate",
    "replay_refusal",
    "split_limits",
    "wants_single_use",
]


def __getattr__(name: str) -> object:
    """The names that need an I/O library, imported when first asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
