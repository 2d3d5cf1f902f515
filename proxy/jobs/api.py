"""The HTTP face of background jobs: the ``202 Accepted`` that takes one, and ``/jobs/<id>``.

The gateway calls :meth:`JobAPI.accept` for a request that passed every check (signature,
policy, limits, single use) and asks to run in the background, and :meth:`JobAPI.serve` for
``GET``/``DELETE /jobs/<id>``. The id is the capability: whoever holds the status URL may read
and cancel the job, and a wrong id is the same 404 whether it is malformed, unknown, expired
or was never issued, so ids cannot be probed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Protocol
from urllib.parse import parse_qsl

import structlog
import trio

from .. import cors, forwarding, policy
from ..config import Config, Credential
from ..errors import MethodNotAllowed, NotFound, Overloaded
from ..forwarding import Headers
from ..http.connection import HTTPConnection, RequestHead
from ..limits import BudgetStore, BudgetTicket, JobHold
from ..metrics import Metrics
from . import model as jobs
from .background import BackgroundAsk, status_url_prefix, stored_headers
from .calls import callback_policy, check_callback_address
from .model import Job, JobRequest
from .runner import JobRunner, not_run_charge, settle_job_budget
from .store import JobStore


class Planned(Protocol):
    """What the gateway decided about a background request (its ``Plan``)."""

    @property
    def request_id(self) -> str: ...
    @property
    def upstream_url(self) -> str: ...
    @property
    def credential(self) -> Credential: ...
    @property
    def ctx(self) -> forwarding.ForwardContext: ...
    @property
    def origin(self) -> str | None: ...
    @property
    def body(self) -> bytes | None: ...
    @property
    def declared_length(self) -> int | None: ...
    @property
    def rules(self) -> policy.RequestPolicy: ...
    @property
    def user(self) -> str | None: ...
    @property
    def background(self) -> BackgroundAsk | None: ...
    @property
    def budget(self) -> BudgetTicket | None: ...
    @property
    def prefix(self) -> str: ...


def _json(document: object) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def _json_headers(body: bytes | None) -> Headers:
    """JSON headers; without ``body`` (a streamed document) no Content-Length: chunked."""
    length = [] if body is None else [(b"content-length", str(len(body)).encode())]
    return [(b"content-type", b"application/json"), *length, (b"cache-control", b"no-store")]


def _extra_headers(config: Config, origin: str | None, request_id: str) -> Headers:
    return [*cors.response_headers(config.cors, origin), (b"x-request-id", request_id.encode())]


# A read whose answer is larger than this is streamed, and only LARGE_READS of them run at once
# per process: a reader that stops reading keeps its job's answer in memory until
# client_write_timeout, so 40 stalled reads of a 4 MB answer must not hold 40 copies.
LARGE_READ_BYTES = 1 << 20
LARGE_READS = 4
LARGE_READ_WAIT = 10.0  # seconds a large read waits for its turn, then 503 job_reads_busy


def no_such_job(config: Config) -> NotFound:
    return NotFound(f"no such job (a finished job can be read for {config.jobs.result_ttl:g} s)", code="job_not_found")


class JobAPI:
    def __init__(
        self,
        store: JobStore,
        runner: JobRunner | None = None,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        budgets: BudgetStore | None = None,
    ):
        self.store = store
        self.runner = runner
        # Where a job cancelled while queued gets its hold back: the runner's budget store.
        self.budgets = budgets if budgets is not None else runner.budgets if runner is not None else None
        self.metrics = metrics
        self.clock = clock
        self.large_reads = trio.Semaphore(LARGE_READS)
        self.large_read_wait = LARGE_READ_WAIT
        self.reads_waiting = 0  # large reads waiting for their turn (they hold no answer meanwhile)

    async def accept(self, head: RequestHead, conn: HTTPConnection, config: Config, plan: Planned) -> Job:
        """Check the body, store the job and answer 202 at once.

        The gateway has read the body (bounded, as for a signed one) into the plan; a request
        without one has ``b""``. Raises like a forwarded request would (body rules), ``403
        callback_address_refused`` for a callback the SSRF guard refuses, and ``503
        job_queue_full`` past ``max_jobs_queued``.
        """
        assert plan.background is not None
        credential = plan.credential
        body = await policy.checked_body(plan.rules, len(plan.body or b""), plan.body or b"")
        callback = plan.background.callback
        if callback is not None:
            await check_callback_address(callback, callback_policy(credential, config.server.allow_private_upstreams))
        forwarded = forwarding.request_headers(head.headers, credential.headers, plan.ctx)
        request = JobRequest(head.method, plan.upstream_url, stored_headers(forwarded, credential.headers), body)
        job = jobs.new_job(
            credential=credential.id,
            request=request,
            status_url_prefix=status_url_prefix(config.jobs.public_url),
            callback=callback,
            user=plan.user,
            now=self.clock(),
            budget=None if plan.budget is None else JobHold.of(plan.budget).to_json(),
        )
        await self.store.add(
            job, max_queued=config.jobs.max_jobs_queued, max_queued_credential=config.job_limits(credential)[0]
        )
        if self.runner is not None:
            self.runner.notify()
        if self.metrics is not None:
            self.metrics.jobs_created.labels(credential.id, "poll" if callback is None else "callback").inc()
        answer = _json(jobs.accepted_document(job))
        headers = _json_headers(answer) + [
            (b"location", job.status_url.encode()),
            (b"preference-applied", b"respond-async"),
            *_extra_headers(config, plan.origin, plan.request_id),
        ]
        await conn.send_full(202, headers, answer)
        return job

    async def serve(self, head: RequestHead, conn: HTTPConnection, config: Config, job_id: str, request_id: str) -> int:
        """Answer ``GET``/``HEAD``/``DELETE /jobs/<id>``; returns the status sent. Refusals raise."""
        extra_headers = _extra_headers(config, head.header(b"origin"), request_id)
        if head.method not in ("GET", "HEAD", "DELETE"):
            raise MethodNotAllowed(f"{head.method} is not allowed on a job: use GET or DELETE")
        if not jobs.valid_job_id(job_id):
            raise no_such_job(config)
        # The request's log line names the job as the runner's lines do (a prefix: the id is a capability).
        structlog.contextvars.bind_contextvars(job=job_id[:12])
        now = self.clock()
        if head.method == "DELETE":
            job = await self.cancel(job_id, now, config)
        else:
            job = await self.store.get(job_id, now=now)
        if job is None:
            raise no_such_job(config)
        if job.result is not None and len(job.result.body) > LARGE_READ_BYTES and head.method != "HEAD":
            del job  # a reader waiting for its turn holds no answer
            return await self._large_read(head, conn, config, job_id, extra_headers)
        return await self._send_job(head, conn, job, extra_headers)

    async def cancel(self, job_id: str, now: float, config: Config) -> Job | None:
        """Cancel the job (None: no such job); the one call that takes it out of the queue gives its budget hold back.

        Only that call: the store decides in the same atomic step as the change, so a cancel that
        loses a race with a runner's claim finds the job running, and a second DELETE finds it
        cancelled. A running job keeps its hold (its upstream may have been called and billed):
        its runner stops without settling it. Shielded (each store call has its own timeout): a
        client that leaves between the cancellation and the refund must not cost the hold."""
        with trio.CancelScope(shield=True):
            cancel = await self.store.cancel(job_id, now=now, result_ttl=config.jobs.result_ttl)
            if cancel is None:
                return None
            if self.runner is not None:
                self.runner.cancel_local(job_id)
            job = cancel.job
            if cancel.dequeued and job.budget is not None:
                # Each earlier run of it (drained back to the queue mid-call) may have been billed: its hold stays.
                await settle_job_budget(
                    job, not_run_charge, interrupted=job.attempts, budgets=self.budgets, metrics=self.metrics
                )
        return job

    async def _large_read(
        self, head: RequestHead, conn: HTTPConnection, config: Config, job_id: str, extra_headers: Headers
    ) -> int:
        """A read of a large answer, in its turn: at most ``LARGE_READS`` hold an answer at once."""
        self.reads_waiting += 1
        try:
            with trio.move_on_after(self.large_read_wait) as waited:
                await self.large_reads.acquire()
        finally:
            self.reads_waiting -= 1
        if waited.cancelled_caught:
            raise Overloaded(
                f"{LARGE_READS} large job answers are being sent already; try again shortly",
                code="job_reads_busy",
                retry_after=1,
            )
        try:
            job = await self.store.get(job_id, now=self.clock())  # read again, now that it may be held
            if job is None:
                raise no_such_job(config)
            return await self._send_job(head, conn, job, extra_headers)
        finally:
            self.large_reads.release()

    async def _send_job(self, head: RequestHead, conn: HTTPConnection, job: Job, extra_headers: Headers) -> int:
        query = dict(parse_qsl(head.query))
        if head.method != "DELETE" and query.get("stream") == "true" and job.result is not None:
            await self._replay(conn, job.result, extra_headers, head.method == "HEAD")
            return job.result.status
        if job.result is not None and len(job.result.body) > LARGE_READ_BYTES and head.method != "HEAD":
            # Streamed: the answer is encoded as it is sent, never held as a whole document.
            await conn.send_head(200, _json_headers(None) + extra_headers, flush=False)
            for piece in jobs.status_document_chunks(job):
                await conn.send_data(piece)
            await conn.send_end()
            return 200
        answer = _json(jobs.status_document(job))
        await conn.send_full(200, _json_headers(answer) + extra_headers, b"" if head.method == "HEAD" else answer)
        return 200

    @staticmethod
    async def _replay(conn: HTTPConnection, result: jobs.JobResult, extra_headers: Headers, head_only: bool) -> None:
        """The stored answer as the upstream sent it; an event stream event by event."""
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in result.headers]
        chunks = jobs.replay_chunks(result)
        streamed = "text/event-stream" in result.content_type.lower()
        if not streamed or head_only:
            headers.append((b"content-length", str(len(result.body)).encode()))
        await conn.send_head(result.status, headers + extra_headers)
        if not head_only:
            for chunk in chunks:
                await conn.send_data(chunk)
        await conn.send_end()
