"""``DELETE /jobs/<id>`` of a job accepted under a budget (proxy.jobs.api ``JobAPI.cancel``): real
job stores (a SQLite file, a real redis-server) and the memory budget store, read back through it.
What the HTTP face does end to end (memory and Redis budgets) is in tests/e2e/test_budgets.py."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from proxy.config import Config
from proxy.jobs import model as jobs
from proxy.jobs.api import JobAPI
from proxy.jobs.model import Job, JobRequest, JobsConfig
from proxy.jobs.redis import RedisJobStore
from proxy.jobs.sqlite import SQLiteJobStore
from proxy.limits import JobHold
from proxy.limits.budget import Applied, BudgetTicket, applied_budgets, request_cost
from proxy.limits.budget_spec import BudgetsConfig, BudgetSpec, PriceTable
from proxy.limits.budget_state import MemoryBudgets
from support.logs import watch_logs
from support.parkway import make_config, with_jobs
from support.redis import RedisServer

NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)
T = NOW.timestamp()


class Accepted:
    """A memory budget, and jobs accepted under it as the gateway accepts them: the hold charged
    as spent, and kept in the job's record."""

    def __init__(self) -> None:
        self.budgets = MemoryBudgets(lambda: NOW)
        self.cost = request_cost(b'{"max_tokens":100}', path="/v1/chat/completions", settings=BudgetsConfig(),
                                 cap=None, want_usage=False)  # fmt: skip
        self.applied: tuple[Applied, ...] = applied_budgets(
            "app", None, "alice", BudgetSpec(1000, "tokens", "day"), self.cost, PriceTable(), NOW
        )[0]

    async def job(self, n: int = 0) -> Job:
        ticket = BudgetTicket(f"hold-{n}", self.applied, self.cost, None, ledger=self.budgets.ledger)
        assert (await self.budgets.reserve(self.applied, ticket.hold_id)).allowed
        await self.budgets.settle(self.applied, ticket.hold_id, [b.hold for b in self.applied])
        return jobs.new_job(
            credential="app", request=JobRequest("POST", "http://127.0.0.1:1/v1/chat/completions", (), b"{}"),
            status_url_prefix="http://parkway/jobs", callback=None, user="alice", now=T + n,
            budget=JobHold.of(ticket).to_json(),
        )  # fmt: skip

    async def spent(self) -> int:
        [level] = await self.budgets.levels([self.applied[0].key])
        assert level.held == 0
        return level.spent


def jobs_config(tmp_path: Path) -> Config:
    return with_jobs(make_config(), JobsConfig(enabled=True, path=str(tmp_path / "jobs.sqlite3")))


@pytest.fixture(params=["sqlite", "redis"])
async def open_store(request: pytest.FixtureRequest, nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator:
    """One more store object on the test's file or server per call, as another process has."""
    server: RedisServer | None = None
    if request.param == "redis":
        server = RedisServer(nursery, tmp_path)
        with trio.fail_after(10):
            await server.start()
        url = server.url
        yield lambda: RedisJobStore(url, key_prefix="t:")
        await server.kill()
    else:
        yield lambda: SQLiteJobStore(tmp_path / "jobs.sqlite3")
    gc.collect()


async def test_only_the_delete_that_dequeues_a_job_refunds_it(open_store, tmp_path: Path) -> None:
    budget, config = Accepted(), jobs_config(tmp_path)
    async with open_store() as store, open_store() as runner:
        api = JobAPI(store, budgets=budget.budgets)
        claimed_first, cancelled_first = await budget.job(0), await budget.job(1)
        for job in (claimed_first, cancelled_first):
            await store.add(job, max_queued=10)
        assert await budget.spent() == 2 * budget.cost.tokens
        with watch_logs() as logs:
            # a runner took it first: cancelled running, the hold stays
            assert (await runner.claim("r", now=T, lease=30)).id == claimed_first.id  # type: ignore[union-attr]
            assert (await api.cancel(claimed_first.id, T + 1, config)).status == "cancelled"  # type: ignore[union-attr]
            assert await budget.spent() == 2 * budget.cost.tokens and not logs.find(event="job_budget_settled")
            # the DELETE first: refunded, and no runner gets it; a second DELETE refunds nothing
            assert (await api.cancel(cancelled_first.id, T + 2, config)).status == "cancelled"  # type: ignore[union-attr]
            assert await budget.spent() == budget.cost.tokens
            assert await runner.claim("r", now=T + 3, lease=30) is None
            assert (await api.cancel(cancelled_first.id, T + 4, config)).status == "cancelled"  # type: ignore[union-attr]
            assert await budget.spent() == budget.cost.tokens
            [settled] = logs.find(event="job_budget_settled")
            assert (settled["job"], settled["budget_estimate"], settled["budget_charge"]) == (
                cancelled_first.id[:12], "nothing:cancelled", 0,
            )  # fmt: skip


async def test_a_job_a_drain_put_back_keeps_the_hold_of_its_cut_run(open_store, tmp_path: Path) -> None:
    """Its first run was cut off mid-call (maybe billed): cancelled while queued again, it is
    settled like the runner settles one, with a hold per interrupted run."""
    budget, config = Accepted(), jobs_config(tmp_path)
    async with open_store() as store:
        job = await budget.job()
        await store.add(job, max_queued=10)
        running = await store.claim("r", now=T, lease=30)
        assert running is not None and await store.finish(jobs.requeued(running), "r")
        with watch_logs() as logs:
            await JobAPI(store, budgets=budget.budgets).cancel(job.id, T + 1, config)
        [settled] = logs.find(event="job_budget_settled")
        assert (settled["interrupted_runs"], settled["budget_charge"]) == (1, budget.cost.tokens)
        assert await budget.spent() == budget.cost.tokens


async def test_a_redis_claim_between_the_deletes_read_and_write_gets_no_refund(
    nursery: trio.Nursery, tmp_path: Path
) -> None:  # fmt: skip
    """The DELETE read the job queued; a runner claims it before the DELETE writes: the
    compare-and-set fails, the DELETE is recomputed on a running job, and refunds nothing."""
    server = RedisServer(nursery, tmp_path)
    with trio.fail_after(10):
        await server.start()
    budget, config = Accepted(), jobs_config(tmp_path)
    claims: list[Job | None] = []

    class ClaimedMeanwhile(RedisJobStore):
        async def _write(self, job: Job, version: str, **bounds: int | None) -> int:
            if job.status == jobs.CANCELLED and not claims:
                async with RedisJobStore(server.url, key_prefix="t:") as runner:
                    claims.append(await runner.claim("r", now=T, lease=30))
            return await super()._write(job, version, **bounds)

    try:
        async with ClaimedMeanwhile(server.url, key_prefix="t:") as store:
            job = await budget.job()
            await store.add(job, max_queued=10)
            with watch_logs() as logs:
                cancelled = await JobAPI(store, budgets=budget.budgets).cancel(job.id, T + 1, config)
            assert [c.id if c else None for c in claims] == [job.id]
            assert cancelled is not None and cancelled.status == "cancelled"
            assert not logs.find(event="job_budget_settled") and await budget.spent() == budget.cost.tokens
    finally:
        await server.kill()
        gc.collect()


async def test_a_dequeued_job_gets_its_hold_back_even_when_its_delete_is_cancelled(tmp_path: Path) -> None:
    """The cancellation is stored, so the refund must be made too: the client that sent the
    DELETE leaving (its request cancelled) must not cost the user the hold."""
    budget, config = Accepted(), jobs_config(tmp_path)
    async with SQLiteJobStore(config.jobs.path) as store:
        job = await budget.job()
        await store.add(job, max_queued=10)
        api = JobAPI(store, budgets=budget.budgets)
        cancelled: Job | None = None
        with trio.CancelScope() as request:
            request.cancel()  # the DELETE's request is cancelled before its store call even starts
            cancelled = await api.cancel(job.id, T, config)
        assert cancelled is not None and cancelled.status == "cancelled"
        assert (await store.get(job.id, now=T)).status == "cancelled"  # type: ignore[union-attr]
    assert await budget.spent() == 0
