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
from urllib.parse import parse_qsl

from . import jobs
from .background import BackgroundAsk, stored_headers
from .config import Config, Credential
from .errors import NotFound, ParkwayError
from .http_server import HTTPConnection, RequestHead
from .jobrunner import JobRunner
from .jobs import Job, JobRequest
from .jobstore import JobStore

Headers = list[tuple[bytes, bytes]]


class MethodNotAllowed(ParkwayError):
    status = 405
    type = "invalid_request_error"
    code = "job_method_not_allowed"


def _json(document: object) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def _json_headers(body: bytes) -> Headers:
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]


def no_such_job(config: Config) -> NotFound:
    return NotFound(f"no such job (a finished job can be read for {config.jobs.result_ttl:g} s)", code="job_not_found")


class JobAPI:
    def __init__(self, store: JobStore, runner: JobRunner | None = None, *, clock: Callable[[], float] = time.time):
        self.store = store
        self.runner = runner
        self.clock = clock

    async def accept(
        self,
        conn: HTTPConnection,
        config: Config,
        *,
        credential: Credential,
        ask: BackgroundAsk,
        method: str,
        upstream_url: str,
        forwarded: Headers,
        body: bytes,
        user: str | None,
        status_prefix: str,
        location_prefix: str,
        extra_headers: Headers,
    ) -> Job:
        """Store the job and answer 202 at once; raises QueueFull (503) past ``max_jobs_queued``."""
        request = JobRequest(method, upstream_url, stored_headers(forwarded, credential.headers), body)
        job = jobs.new_job(
            credential=credential.id,
            request=request,
            status_url_prefix=status_prefix,
            callback=ask.callback,
            user=user,
            now=self.clock(),
        )
        await self.store.add(job, max_queued=config.jobs.max_jobs_queued)
        if self.runner is not None:
            self.runner.notify()
        answer = _json(jobs.accepted_document(job))
        headers = _json_headers(answer) + [
            (b"location", f"{location_prefix}/jobs/{job.id}".encode()),
            (b"preference-applied", b"respond-async"),
            *extra_headers,
        ]
        await conn.send_full(202, headers, answer)
        return job

    async def serve(
        self, head: RequestHead, conn: HTTPConnection, config: Config, job_id: str, extra_headers: Headers
    ) -> int:
        """Answer ``GET``/``HEAD``/``DELETE /jobs/<id>``; returns the status sent. Refusals raise."""
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
