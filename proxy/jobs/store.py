"""How job stores keep jobs, pure: the record as bytes, the indexes derived from it, the Protocol.

Both backends (:mod:`proxy.jobs.sqlite`, the embedded default, and
:mod:`proxy.jobs.redis`, for several processes or machines) store the record
:func:`job_to_json` writes next to the :class:`Index` that :func:`index_of` derives from it, and
make every state change with the pure functions of :mod:`proxy.jobs.model` in one atomic step.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import Overloaded
from .model import IN_PROGRESS, PENDING, QUEUED, Delivery, Job, JobError, JobRequest, JobResult, Pairs


@dataclass(frozen=True, slots=True)
class Index:
    """Where a job appears in a store's indexes (None = absent), all derived from the record:
    the queue (by creation), running jobs (by lease expiry), due deliveries, and expiry."""

    queued_at: float | None
    lease_until: float | None
    delivery_at: float | None
    expires_at: float | None


def index_of(job: Job) -> Index:
    delivering = job.delivery.state == PENDING
    return Index(
        queued_at=job.created_at if job.status == QUEUED else None,
        lease_until=job.lease_until if job.status == IN_PROGRESS else None,
        delivery_at=job.delivery.next_at if delivering else None,
        # Kept while its delivery may still run, then until its result TTL.
        expires_at=None if not job.terminal or delivering else job.expires_at,
    )


def expired(job: Job, now: float) -> bool:
    expires = index_of(job).expires_at
    return expires is not None and expires <= now


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def job_to_json(job: Job) -> bytes:
    """The record as stored: JSON, bodies in base64 (stores keep the index beside it)."""
    r, d = job.request, job.delivery
    record: dict[str, Any] = {
        "v": 1, "id": job.id, "credential": job.credential, "created_at": job.created_at,
        "request": {"method": r.method, "url": r.url, "headers": list(map(list, r.headers)), "body": _b64(r.body)},
        "status_url": job.status_url, "webhook_id": job.webhook_id, "callback": job.callback, "user": job.user,
        "status": job.status, "attempts": job.attempts, "owner": job.owner, "lease_until": job.lease_until,
        "started_at": job.started_at, "finished_at": job.finished_at, "expires_at": job.expires_at,
        "delivery": {"state": d.state, "attempts": d.attempts, "next_at": d.next_at, "first_at": d.first_at,
                     "last_status": d.last_status, "last_error": d.last_error},
    }  # fmt: skip
    if job.result is not None:
        res = job.result
        record["result"] = {"status": res.status, "headers": list(map(list, res.headers)), "body": _b64(res.body)}
    if job.error is not None:
        record["error"] = {"code": job.error.code, "message": job.error.message}
    if job.budget is not None:
        record["budget"] = job.budget
    return json.dumps(record, separators=(",", ":")).encode()


def _pairs(items: Iterable[Iterable[str]]) -> Pairs:
    return tuple((str(n), str(v)) for n, v in items)


def job_from_json(data: bytes | str) -> Job:
    """Inverse of :func:`job_to_json`; raises ValueError on a record it cannot read."""
    try:
        rec = json.loads(data)
        req, d = rec["request"], rec["delivery"]
        result = rec.get("result")
        error = rec.get("error")
        budget = rec.get("budget")  # absent in records written before jobs were settled
        return Job(
            id=rec["id"], credential=rec["credential"], created_at=rec["created_at"],
            request=JobRequest(req["method"], req["url"], _pairs(req["headers"]), base64.b64decode(req["body"])),
            status_url=rec["status_url"], webhook_id=rec["webhook_id"], callback=rec["callback"], user=rec["user"],
            status=rec["status"], attempts=rec["attempts"], owner=rec["owner"], lease_until=rec["lease_until"],
            started_at=rec["started_at"], finished_at=rec["finished_at"], expires_at=rec["expires_at"],
            result=None if result is None else JobResult(
                result["status"], _pairs(result["headers"]), base64.b64decode(result["body"])
            ),
            error=None if error is None else JobError(error["code"], error["message"]),
            delivery=Delivery(d["state"], d["attempts"], d["next_at"], d["first_at"], d["last_status"], d["last_error"]),
            budget=None if budget is None else dict(budget),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"unreadable job record: {type(exc).__name__}: {exc}") from None


# --- the store's face --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What the metrics show: jobs by status, deliveries pending, the oldest queued job's age."""

    by_status: Mapping[str, int]
    deliveries_pending: int
    oldest_queued_age: float  # seconds; 0 when nothing is queued


@dataclass(frozen=True, slots=True)
class Cancellation:
    """What one cancel did: the job as it is afterwards, and the status this very call moved it
    from (None: it was already terminal and nothing changed). Made in the same atomic step as the
    change, so of a cancel and a claim racing for a queued job exactly one sees it queued."""

    job: Job
    was: str | None

    @property
    def dequeued(self) -> bool:
        """This call cancelled the job while it was queued: no run of it was going on, so its
        budget hold is given back (:meth:`proxy.jobs.api.JobAPI.serve`)."""
        return self.was == QUEUED


def cancellation(before: Job, after: Job) -> Cancellation:
    return Cancellation(after, None if before.terminal else before.status)


class QueueFull(Overloaded):
    """``max_jobs_queued`` jobs are already waiting: 503 with Retry-After, at once."""

    code = "job_queue_full"

    def __init__(self, message: str, *, retry_after: int = 5):
        super().__init__(message, retry_after=retry_after)


def credential_queue_full(credential: str, queued: int, limit: int) -> str:
    return f"credential {credential!r} has {queued} jobs queued (its max_jobs_queued = {limit})"


class JobStore(Protocol):
    """Where jobs live; every method is atomic against other runners of the same store.

    Implementations: :mod:`proxy.jobs.sqlite` (the default) and :mod:`proxy.jobs.redis`.
    ``now`` is UNIX seconds from the caller's clock.
    """

    async def add(self, job: Job, *, max_queued: int, max_queued_credential: int | None = None) -> None:
        """Store a new queued job; raise QueueFull when ``max_queued`` jobs are already queued, or
        ``max_queued_credential`` of the job's credential."""

    async def get(self, job_id: str, *, now: float) -> Job | None:
        """The job, or None when it never existed or has expired."""

    async def claim(
        self, owner: str, *, now: float, lease: float, skip_credentials: Set[str] = frozenset(),
        skip_ids: Set[str] = frozenset(),
    ) -> Job | None:  # fmt: skip
        """Take the oldest runnable job (queued, or in_progress with an expired lease) as :func:`claimed`,
        passing over those of ``skip_credentials`` (at their running limit here) and ``skip_ids``."""

    async def renew(self, job_id: str, owner: str, *, until: float) -> bool:
        """Extend ``owner``'s lease; False once the job is no longer its own (cancelled, reclaimed)."""

    async def finish(self, job: Job, owner: str) -> bool:
        """Write ``job`` (completed, failed or requeued) if ``owner`` still holds it; else False."""

    async def cancel(self, job_id: str, *, now: float, result_ttl: float) -> Cancellation | None:
        """Cancel a queued or running job (:func:`cancelled`) in one atomic step; the job as it is
        afterwards (unchanged when already terminal) and the status this call cancelled it from
        (None: no such job)."""

    async def claim_delivery(self, *, now: float, lease: float) -> Job | None:
        """A job whose delivery is due, hidden from other runners for ``lease`` seconds."""

    async def delivered(self, job: Job) -> None:
        """Write the delivery state after an attempt (:func:`after_attempt`)."""

    async def purge(self, *, now: float) -> int:
        """Forget terminal jobs past ``expires_at`` whose delivery is not pending; return how many."""

    async def stats(self, *, now: float) -> StoreStats:
        """Counts for metrics (jobs still stored, by status)."""
