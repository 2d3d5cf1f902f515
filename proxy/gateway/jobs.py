"""The gateway's part of background jobs: step 7 of a background request (stored as a job,
answered 202) and ``/jobs/<id>`` (:mod:`proxy.jobs.api` answers both)."""

from __future__ import annotations

import structlog

from ..config import Config
from ..errors import Overloaded
from ..http.connection import HTTPConnection, RequestHead
from ..jobs.api import JobAPI, no_such_job
from ..record import RequestRecord
from .plan import Request


async def enqueue(jobs: JobAPI | None, req: Request) -> None:
    """Step 7 of a background request: stored as a job, answered 202 at once (proxy.jobs.api).
    The plan holds the body: the gateway read it (bounded) before admission."""
    if jobs is None:
        raise Overloaded("background jobs are not running in this process", code="jobs_unavailable")
    job = await jobs.accept(req.head, req.conn, req.config, req.plan)
    structlog.contextvars.bind_contextvars(job=job.id[:12])
    if req.record.trace is not None:  # the job's own trace will link back to this request
        req.record.trace.created_job(job.id)
    req.record.status, req.record.completed = 202, True


async def serve_job(
    jobs: JobAPI | None, head: RequestHead, conn: HTTPConnection, config: Config, record: RequestRecord, request_id: str,
    job_id: str,
) -> None:  # fmt: skip
    """``GET``/``DELETE /jobs/<id>``: the id is the capability; no signature is involved."""
    async for _ in conn.body_chunks():  # drained: the request has no use for a body
        pass
    record.upstream_path = "/jobs/…"  # never the id in a log line: it grants access to the job
    if jobs is None:
        raise no_such_job(config)
    record.status = await jobs.serve(head, conn, config, job_id, request_id)
    record.completed = True
