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

from .. import cors, forwarding, policy
from ..config import Config, Credential
from ..errors import MethodNotAllowed, NotFound
from ..forwarding import Headers
from ..http.connection import HTTPConnection, RequestHead
from ..metrics import Metrics
from . import model as jobs
from .background import BackgroundAsk, status_url_prefix, stored_headers
from .calls import callback_policy, check_callback_address
from .model import Job, JobRequest
from .runner import JobRunner
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
    def prefix(self) -> str: ...


def _json(document: object) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def _json_headers(body: bytes) -> Headers:
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]


def _extra_headers(config: Config, origin: str | None, request_id: str) -> Headers:
    return [*cors.response_headers(config.cors, origin), (b"x-request-id", request_id.encode())]


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
    ):
        self.store = store
        self.runner = runner
        self.metrics = metrics
        self.clock = clock

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
        host = head.header(b"host") or "localhost"
        job = jobs.new_job(
            credential=credential.id,
            request=request,
            status_url_prefix=status_url_prefix(plan.ctx.proto, host, plan.prefix),
            callback=callback,
            user=plan.user,
            now=self.clock(),
        )
        await self.store.add(job, max_queued=config.jobs.max_jobs_queued)
        if self.runner is not None:
            self.runner.notify()
        if self.metrics is not None:
            self.metrics.jobs_created.labels(credential.id, "poll" if callback is None else "callback").inc()
        answer = _json(jobs.accepted_document(job))
        headers = _json_headers(answer) + [
            (b"location", f"{plan.prefix}/jobs/{job.id}".encode()),
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
        now = self.clock()
        if head.method == "DELETE":
            job = await self.store.cancel(job_id, now=now, result_ttl=config.jobs.result_ttl)
            if job is not None and self.runner is not None:
                self.runner.cancel_local(job_id)
        else:
            job = await self.store.get(job_id, now=now)
        if job is None:
            raise no_such_job(config)
        query = dict(parse_qsl(head.query))
        if head.method != "DELETE" and query.get("stream") == "true" and job.result is not None:
            await self._replay(conn, job.result, extra_headers, head.method == "HEAD")
            return job.result.status
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
