"""The DELETE of a queued job under a budget (proxy.jobs.api): a real SQLite store and the
memory budget store; what the HTTP face does end to end is in tests/e2e/test_budgets.py."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import trio

from proxy.jobs import model as jobs
from proxy.jobs.api import JobAPI
from proxy.jobs.model import JobRequest, JobsConfig
from proxy.jobs.sqlite import SQLiteJobStore
from proxy.limits import JobHold
from proxy.limits.budget import BudgetTicket, applied_budgets, request_cost
from proxy.limits.budget_spec import BudgetsConfig, BudgetSpec, PriceTable
from proxy.limits.budget_state import MemoryBudgets
from support.parkway import make_config, with_jobs

NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)


async def test_a_dequeued_job_gets_its_hold_back_even_when_its_delete_is_cancelled(tmp_path: Path) -> None:
    """The cancellation is stored, so the refund must be made too: the client that sent the
    DELETE leaving (its request cancelled) must not cost the user the hold."""
    config = with_jobs(make_config(), JobsConfig(enabled=True, path=str(tmp_path / "jobs.sqlite3")))
    budgets = MemoryBudgets(lambda: NOW)
    spec = BudgetSpec(1000, "tokens", "day")
    cost = request_cost(b'{"max_tokens":100}', path="/v1/chat/completions", settings=BudgetsConfig(), cap=None,
                        want_usage=False)  # fmt: skip
    applied, price = applied_budgets("app", None, "alice", spec, cost, PriceTable(), NOW)
    ticket = BudgetTicket("hold-1", applied, cost, price, ledger=budgets.ledger)
    assert (await budgets.reserve(applied, "hold-1")).allowed  # accepted: the hold charged as spent
    await budgets.settle(applied, "hold-1", [b.hold for b in applied])
    [level] = await budgets.levels([applied[0].key])
    assert (level.spent, level.held) == (cost.tokens, 0)
    async with SQLiteJobStore(config.jobs.path) as store:
        job = jobs.new_job(
            credential="app", request=JobRequest("POST", "http://127.0.0.1:1/v1/chat/completions", (), b"{}"),
            status_url_prefix="http://parkway/jobs", callback=None, user="alice", now=NOW.timestamp(),
            budget=JobHold.of(ticket).to_json(),
        )  # fmt: skip
        await store.add(job, max_queued=10)
        api = JobAPI(store, budgets=budgets)
        with trio.CancelScope() as request:
            request.cancel()  # the DELETE's request is cancelled before its store call even starts
            cancelled = await api._cancel(job.id, NOW.timestamp(), config)
        assert cancelled is not None and cancelled.status == "cancelled"
        assert (await store.get(job.id, now=NOW.timestamp())).status == "cancelled"  # type: ignore[union-attr]
    [level] = await budgets.levels([applied[0].key])
    assert (level.spent, level.held) == (0, 0)
