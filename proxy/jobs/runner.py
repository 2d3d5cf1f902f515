"""The job runner: makes queued jobs' upstream calls and delivers their results (Trio).

It runs in the app's nursery beside the servers. One task claims jobs from the store while
fewer than ``max_jobs_in_flight`` run here; each job is one task that makes the upstream call
with Parkway's own httpx2 client (:mod:`proxy.jobs.calls`: the SSRF guard and the credential's
injected headers apply as for a browser's request), reads the answer whole and stores it.
Another task claims due deliveries and POSTs each, signed as Standard Webhooks, through the
same client with the credential's ``allowed_callbacks`` as its address policy.

Leases make it safe to run many runners on one store: a running job's lease is renewed every
``lease / 3``; a process that dies stops renewing and, ``lease`` seconds later, any runner
claims the job again and repeats its upstream call (so a non-idempotent upstream call may run
twice; see docs/jobs.md). A delivery is hidden for ``delivery_timeout`` + a margin while it is
attempted, and becomes due again if its runner dies: at least once, same ``webhook-id``.

:meth:`JobRunner.drain` (SIGTERM) stops claiming, lets running jobs finish until the drain
deadline, then puts the ones still running back in the queue for the next start.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import httpx2 as httpx
import structlog
import trio

from .. import limits
from ..config import Config, StateConfig
from ..errors import ParkwayError
from ..limits import BudgetStore, Charge, Lease, Outage, RequestCost, StateBackend
from ..metrics import Metrics
from ..relay.usage import UsageObserver
from . import model as jobs
from .calls import fetch_answer, post_webhook
from .model import AttemptOutcome, Job, JobError, JobsConfig
from .store import JobStore, StoreStats

if TYPE_CHECKING:  # loaded only when tracing is on
    from ..telemetry.tracing import Tracing

log = structlog.get_logger("parkway.jobs")

DELIVERY_CONCURRENCY = 32  # delivery attempts at once per process
DELIVERY_LEASE_MARGIN = 30.0  # a delivery is hidden this much longer than its timeout
NOT_CALLED = ("unknown_credential", "job_abandoned")  # a run that failed with these never called the upstream


@asynccontextmanager
async def open_job_store(config: JobsConfig, state: StateConfig) -> AsyncIterator[JobStore]:
    """The configured store, open for the ``async with``; Redis is the ``[state]`` server."""
    if config.store == "redis":
        from .redis import RedisJobStore  # coredis only when Redis is configured

        async with RedisJobStore(state.url, key_prefix=state.key_prefix) as redis_store:
            yield redis_store
        return
    from .sqlite import SQLiteJobStore

    async with SQLiteJobStore(config.path) as sqlite_store:
        yield sqlite_store


class JobRunner:
    """Runs the jobs of ``store``; ``config()`` is read afresh for each job (reloads apply)."""

    def __init__(
        self,
        store: JobStore,
        client: httpx.AsyncClient,
        config: Callable[[], Config],
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        owner: str | None = None,
        state: StateBackend | None = None,
        budgets: BudgetStore | None = None,
    ):
        self.store = store
        self.budgets = budgets  # where a job accepted under budgets is settled (docs/budgets.md#jobs)
        self.state = state  # the limits' state: a run holds its credential's and user's max_concurrent slots
        self.client = client
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.running: dict[str, trio.CancelScope] = {}
        self.running_by_credential: Counter[str] = Counter()
        # Jobs given back because their credential or user was at max_concurrent: passed over
        # until this (trio) time, or until a run here ends.
        self.deferred: dict[str, float] = {}
        self.deferred_credentials: dict[str, float] = {}  # the same for a credential at its max_concurrent
        self.deferrals: Counter[str] = Counter()  # jobs given back, by the scope of the full limit
        self.accepting = True
        self._work: trio.Nursery | None = None
        self._wake_jobs = trio.Event()
        self._wake_deliveries = trio.Event()
        self._slots = trio.Semaphore(DELIVERY_CONCURRENCY)
        self.changed = trio.Event()  # set (and replaced) after each job run or delivery attempt
        self.outage = Outage(retry_interval=0)  # only for logging an outage once
        self.tracing: Tracing | None = None  # set by the app when tracing is on: a trace per run and delivery

    @property
    def settings(self) -> JobsConfig:
        return self.config().jobs

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Claim and run jobs and deliveries until :meth:`drain` has finished."""
        async with trio.open_nursery() as outer:
            outer.start_soon(self._renew_leases)
            outer.start_soon(self._purge_expired)
            async with trio.open_nursery() as work:
                self._work = work
                work.start_soon(self._claim_jobs)
                work.start_soon(self._claim_deliveries)
                task_status.started()
            outer.cancel_scope.cancel()
        log.info("jobs_drained", requeued_to_store=True)

    def notify(self) -> None:
        """A job was just queued: look for it now instead of at the next poll."""
        self._wake_jobs.set()

    def drain(self, timeout: float) -> None:
        """Stop claiming; running jobs get ``timeout`` seconds, then go back to the queue."""
        if not self.accepting:
            return
        self.accepting = False
        log.info("jobs_draining", running=len(self.running), drain_timeout=timeout)
        self._wake_jobs.set()
        self._wake_deliveries.set()
        if self._work is not None:
            self._work.cancel_scope.deadline = trio.current_time() + timeout

    def cancel_local(self, job_id: str) -> None:
        """Stop the upstream call of a job cancelled through this process (DELETE)."""
        scope = self.running.get(job_id)
        if scope is not None:
            scope.cancel()

    async def _sleep_until_woken(self, event_name: str) -> None:
        with trio.move_on_after(self.settings.poll_interval):
            await getattr(self, event_name).wait()
        setattr(self, event_name, trio.Event())

    # --- jobs -----------------------------------------------------------------------------------

    def _full_credentials(self, config: Config) -> frozenset[str]:
        """Credentials whose jobs run here at their ``max_jobs_running`` already."""
        full = set()
        for credential_id, count in self.running_by_credential.items():
            credential = config.credential(credential_id)
            if credential is not None and count >= config.job_limits(credential)[1]:
                full.add(credential_id)
        return frozenset(full)

    async def _claim_jobs(self) -> None:
        assert self._work is not None
        while self.accepting:
            config = self.config()
            settings = config.jobs
            job = None
            if len(self.running) < settings.max_jobs_in_flight:
                moment = trio.current_time()
                self.deferred = {i: until for i, until in self.deferred.items() if until > moment}
                self.deferred_credentials = {c: u for c, u in self.deferred_credentials.items() if u > moment}
                skip_credentials = self._full_credentials(config) | self.deferred_credentials.keys()
                job = await self._quietly(
                    self.store.claim, self.owner, now=self.clock(), lease=settings.lease,
                    skip_credentials=skip_credentials, skip_ids=frozenset(self.deferred),
                )  # fmt: skip
            if job is None:
                await self._sleep_until_woken("_wake_jobs")
                continue
            try:
                lease = await self._take_concurrency(job, config)
            except BaseException:  # the drain deadline while the state answered: not run, so not kept
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await self._quietly(self.store.finish, jobs.released(job), self.owner)
                log.warning("job_released", job=job.id[:12], reason="drain deadline before its run began")
                raise
            if lease is False:
                continue  # given back: its credential or user is at max_concurrent
            scope = trio.CancelScope()
            self.running[job.id] = scope
            self.running_by_credential[job.credential] += 1
            self._work.start_soon(self._run_job, job, scope, lease)

    async def _take_concurrency(self, job: Job, config: Config) -> Lease | None | Literal[False]:
        """The job's slots of its credential's and user's ``max_concurrent`` (shared with proxied
        requests), or False when one is full: then the job goes back to the queue in its place,
        passed over for ``poll_interval`` (or until a run here ends)."""
        credential = config.credential(job.credential)
        if self.state is None or credential is None:
            return None
        keys = limits.split_limits(
            limits.limit_keys(credential.id, credential.limits, job.user, credential.user_limits)
        )[1]
        if not keys:
            return None
        try:
            decision = await self.state.acquire(keys, trio.current_time())
        except ParkwayError:  # the state store failed closed: try again later
            decision = limits.Decision(False)
        if decision.allowed:
            return decision.lease
        until = trio.current_time() + config.jobs.poll_interval
        if decision.scope == limits.CREDENTIAL:  # none of its jobs can run: pass over all of them
            self.deferred_credentials[job.credential] = until
        else:  # its user's: other users' jobs of the credential may run
            self.deferred[job.id] = until
        await self._quietly(self.store.finish, jobs.released(job), self.owner)
        self.deferrals[decision.scope or "unknown"] += 1
        self._changed()
        log.info("job_deferred", job=job.id[:12], credential=job.credential, limit=decision.limit, scope=decision.scope)
        return False

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def _run_job(self, job: Job, scope: trio.CancelScope, lease: Lease | None = None) -> None:
        settings = self.settings
        log.info("job_started", job=job.id[:12], credential=job.credential, attempt=job.attempts)
        try:
            final: Job | None = None
            with scope:
                if job.attempts > settings.max_attempts:
                    error = JobError("job_abandoned", f"abandoned after {settings.max_attempts} interrupted runs")
                    final = jobs.failed(job, error, now=self.clock(), result_ttl=settings.result_ttl)
                else:
                    final = await self._execute(job, settings)
            if final is None:  # cancelled by DELETE or lease lost: the store already says so
                log.info("job_stopped", job=job.id[:12], reason="cancelled or taken over")
                return
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                written = await self._quietly(self.store.finish, final, self.owner)
            self._count_run(final.status if written else "lost")
            log.info("job_finished", job=job.id[:12], status=final.status, stored=bool(written),
                     upstream_status=final.result.status if final.result else None,
                     error=final.error.code if final.error else None)  # fmt: skip
            if written and final.delivery.state == jobs.PENDING:
                self._wake_deliveries.set()
            if written and job.budget is not None:  # only the run whose end was stored settles
                with trio.CancelScope(shield=True):
                    await self._settle_budget(job, final)
        except trio.Cancelled:
            # The drain deadline: back to the queue for the next start (or another process).
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self._quietly(self.store.finish, jobs.requeued(job), self.owner)
            self._count_run("requeued")
            log.warning("job_requeued", job=job.id[:12], reason="drain deadline")
            raise
        finally:
            del self.running[job.id]
            self.running_by_credential[job.credential] -= 1
            if not self.running_by_credential[job.credential]:
                del self.running_by_credential[job.credential]
            if lease is not None and self.state is not None:
                with trio.CancelScope(shield=True):
                    await self.state.release(lease)
            self.deferred.clear()  # a slot may have come free: jobs passed over may run now
            self.deferred_credentials.clear()
            self._wake_jobs.set()
            self._changed()

    async def _execute(self, job: Job, settings: JobsConfig) -> Job:
        """The upstream call, its answer read whole: a completed or failed job."""
        config = self.config()
        now = self.clock
        credential = config.credential(job.credential)
        if credential is None:
            error = JobError("unknown_credential", f"credential {job.credential!r} is no longer configured")
            return jobs.failed(job, error, now=now(), result_ttl=settings.result_ttl)
        try:
            tracing, request = self.tracing, job.request
            with (
                trio.fail_after(config.server.request_timeout or float("inf")),
                tracing.job_run(job.id, job.credential, request.method, request.url, request.body)
                if tracing is not None
                else nullcontext() as call,
            ):
                propagated = tracing.traceparent(call) if tracing is not None and credential.propagate_trace else None
                result = await fetch_answer(self.client, job, credential, config, traceparent=propagated)
                if tracing is not None and call is not None:
                    tracing.job_answer(call, result.status, result.content_type, result.body)
        except trio.TooSlowError:
            error = JobError("request_timeout", f"the upstream call exceeded {config.server.request_timeout:g} s")
            return jobs.failed(job, error, now=now(), result_ttl=settings.result_ttl)
        except ParkwayError as exc:
            return jobs.failed(job, JobError(exc.code, exc.message), now=now(), result_ttl=settings.result_ttl)
        return jobs.completed(job, result, now=now(), result_ttl=settings.result_ttl)

    async def _settle_budget(self, job: Job, final: Job) -> None:
        """Replace the hold the gateway charged when it accepted ``job`` by what this run cost
        (:func:`run_charge`), plus the hold for each earlier run that was cut off."""
        await settle_job_budget(
            job, partial(run_charge, final), interrupted=max(0, job.attempts - 1), budgets=self.budgets,
            metrics=self.metrics,
        )  # fmt: skip

    async def _renew_leases(self) -> None:
        """Keep this process's jobs its own; a job cancelled or taken over elsewhere is stopped."""
        while True:
            await trio.sleep(self.settings.lease / 3)
            settings = self.settings
            for job_id, scope in list(self.running.items()):
                until = self.clock() + settings.lease
                if await self._quietly(self.store.renew, job_id, self.owner, until=until) is False:
                    scope.cancel()

    async def _purge_expired(self) -> None:
        """Delete jobs past their ``result_ttl`` (prompt and answer with them), at start and then
        every ``purge_interval``: a 404 alone would leave them on disk. Any process may purge."""
        while True:
            purged = await self._quietly(self.store.purge, now=self.clock())
            if purged:
                log.info("jobs_purged", count=purged)
                self._changed()
            await trio.sleep(self.settings.purge_interval)

    # --- deliveries -----------------------------------------------------------------------------

    async def _claim_deliveries(self) -> None:
        assert self._work is not None
        while self.accepting:
            await self._slots.acquire()
            lease = self.settings.delivery_timeout + DELIVERY_LEASE_MARGIN
            job = await self._quietly(self.store.claim_delivery, now=self.clock(), lease=lease)
            if job is None:
                self._slots.release()
                await self._sleep_until_woken("_wake_deliveries")
                continue
            self._work.start_soon(self._deliver, job)

    async def _deliver(self, job: Job) -> None:
        try:
            outcome = await self.attempt_delivery(job)
            updated = jobs.after_attempt(job, outcome, now=self.clock(), schedule=self.settings.schedule)
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self._quietly(self.store.delivered, updated)
            d = updated.delivery
            result = "retry" if d.state == jobs.PENDING else d.state
            if self.metrics is not None:
                self.metrics.job_deliveries.labels(result).inc()
            log.info("webhook_delivery", job=job.id[:12], webhook_id=job.webhook_id, attempt=d.attempts,
                     status=outcome.status, error=outcome.error, result=result,
                     next_in_s=round(d.next_at - self.clock(), 1) if d.next_at else None)  # fmt: skip
        finally:
            self._slots.release()
            self._changed()

    async def attempt_delivery(self, job: Job) -> AttemptOutcome:
        """POST the job's webhook once; what the receiver answered (or why nothing came)."""
        config = self.config()
        settings = config.jobs
        credential = config.credential(job.credential)
        if credential is None or not credential.webhook_secrets or job.callback is None:
            return AttemptOutcome(None, error="credential or its webhook secret is gone", permanent=True)
        body = jobs.webhook_payload(job, inline_limit=settings.inline_payload_bytes)
        tracing = self.tracing
        with tracing.webhook_delivery(job.id, job.callback) if tracing is not None else nullcontext() as span:
            outcome = await post_webhook(self.client, job, credential, config, now=self.clock(), body=body)
            if tracing is not None and span is not None:
                tracing.delivery_outcome(span, outcome.status, outcome.error)
        return outcome

    # --- plumbing -------------------------------------------------------------------------------

    async def _quietly(self, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A store call whose failure is answered with None: the runner tries again on its next
        round rather than dying with the process. An outage is logged when it starts and ends."""
        try:
            result = await operation(*args, **kwargs)
        except ParkwayError as exc:
            if self.outage.failed(trio.current_time()):
                log.error("job_store_unavailable", error=exc.message)
            return None
        length = self.outage.succeeded(trio.current_time())
        if length is not None:
            log.warning("job_store_recovered", outage_s=round(length, 3))
        return result

    def _count_run(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.job_runs.labels(outcome).inc()

    async def refresh_stats(self) -> StoreStats | None:
        """Store counts into the gauges (called by the metrics endpoint's refresh loop)."""
        stats = await self._quietly(self.store.stats, now=self.clock())
        if stats is not None and self.metrics is not None:
            for status, count in stats.by_status.items():
                self.metrics.jobs.labels(status).set(count)
            self.metrics.jobs_deliveries_pending.set(stats.deliveries_pending)
            self.metrics.jobs_oldest_queued_age.set(stats.oldest_queued_age)
            self.metrics.jobs_running.set(len(self.running))
        return stats


# --- settling a job's budget hold (docs/budgets.md#background-jobs) --------------------------------


def run_charge(final: Job, cost: RequestCost) -> Charge:
    """What the run that ended as ``final`` cost: the usage its upstream reported (read from the
    stored answer with the relay's reader), else the hold ``cost`` (an honest upper estimate),
    nothing when the upstream refused it (4xx) or was never called."""
    if final.result is not None:
        status = final.result.status
        observer = UsageObserver(dict((n.lower(), v) for n, v in final.result.headers).get("content-type", ""))
        observer.feed(final.result.body)
        observer.finish(True)
        usage = observer.usage
        used = None if usage is None else (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
        return limits.charge_for(cost, used, status=status, outcome="ok", error_code=None, background=False)
    code = final.error.code if final.error is not None else "unknown"
    # The credential gone, or too many interrupted runs: this run never called the upstream.
    outcome = f"refused:{code}" if code in NOT_CALLED else "upstream_error"
    return limits.charge_for(cost, None, status=None, outcome=outcome, error_code=code, background=False)


def not_run_charge(cost: RequestCost) -> Charge:
    """A job cancelled while queued: no run of it was going on, nothing to charge for this one."""
    return limits.charge_for(cost, None, status=None, outcome="refused:cancelled", error_code="cancelled",
                             background=False)  # fmt: skip


async def settle_job_budget(
    job: Job, charge_of: Callable[[RequestCost], Charge], *, interrupted: int, budgets: BudgetStore | None,
    metrics: Metrics | None,
) -> bool:  # fmt: skip
    """Settle the hold the gateway charged as spent when it accepted ``job``: its budgets get the
    difference between what it cost (``charge_of`` the hold's cost, plus the hold for each of the
    ``interrupted`` runs: cut off, maybe billed upstream) and the hold. Used by the runner when a
    run's end is stored and by ``DELETE /jobs/<id>`` for a job it took out of the queue; logged
    ``job_budget_settled``, ``budget_charge_lost`` when the budget store surely did not record it
    (the hold then stays charged: never overspent), or ``budget_charge_unknown`` when it was sent
    but not answered (it may be recorded when Redis answers; else the hold stays charged).
    Shielded: the job store has recorded the job's end already, so a settlement given up would
    never be made. True when recorded."""
    assert job.budget is not None
    try:
        hold = limits.JobHold.from_json(job.budget)
    except (KeyError, TypeError, ValueError) as exc:
        log.error("job_budget_unreadable", job=job.id[:12], error=f"{type(exc).__name__}: {exc}",
                  charged="the hold, when it was accepted")  # fmt: skip
        return False
    charge = charge_of(hold.cost)
    ledger = budgets.ledger if budgets is not None else ""
    amounts = limits.job_settlement(hold, charge, interrupted=interrupted, ledger=ledger)
    with trio.CancelScope(shield=True):
        settled = await budgets.settle(hold.budgets, "job", amounts) if budgets is not None else None
    recorded = settled is limits.Settlement.RECORDED
    tokens = charge.input_tokens + charge.output_tokens + interrupted * hold.cost.tokens
    estimate = limits.USAGE if charge.kind == limits.USAGE else f"{charge.kind}:{charge.why}"
    if recorded and metrics is not None:
        if tokens:
            metrics.budget_tokens.labels(job.credential).inc(tokens)
        if hold.price is not None:
            c, h = charge, hold.cost
            nano = hold.price.cost(c.input_tokens, c.cached_tokens, c.output_tokens) + interrupted * hold.price.cost(
                h.input_tokens, 0, h.output_tokens
            )
            metrics.budget_usd.labels(job.credential).inc(nano / limits.NANO_USD)
    fields: dict[str, Any] = dict(
        job=job.id[:12], credential=job.credential, budget_hold=hold.cost.tokens, budget_charge=tokens,
        budget_estimate=estimate, interrupted_runs=interrupted, same_ledger=ledger == hold.ledger,
    )  # fmt: skip
    if recorded:
        log.info("job_budget_settled", **fields)
    elif settled is limits.Settlement.UNKNOWN:
        log.warning("budget_charge_unknown", **fields, reason="the budget store did not answer; the settlement may "
                    "be recorded when Redis answers, else the job stays charged its hold")  # fmt: skip
    else:
        log.error("budget_charge_lost", **fields, reason="the budget store is unreachable or not running here; "
                  "the settlement was not sent; the job stays charged its hold")  # fmt: skip
    return recorded
