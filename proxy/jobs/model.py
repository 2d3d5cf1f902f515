"""Background jobs, pure: the job record, its state changes, the delivery schedule, the JSON shown.

A job is one upstream request Parkway makes on its own after answering ``202 Accepted``. Its
life (OpenAI's status names)::

    queued ──claim──▶ in_progress ──▶ completed | failed
       │                 │  ▲ lease expired (process died): claimed again
       └──── DELETE ─────┴──┴──▶ cancelled             drain: back to queued

A terminal job with a callback then has a delivery: ``pending`` until the receiver answers 2xx
(``delivered``), answers 410 (``stopped``) or the retry schedule runs out (``failed``).

Everything here takes ``now`` (UNIX seconds) as an argument and returns new frozen records;
the stores persist them and the runner does the I/O. Ids come from :mod:`secrets`.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
STATUSES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})

# Delivery states of a job with a callback.
NO_DELIVERY, PENDING, DELIVERED, GAVE_UP, STOPPED = "none", "pending", "delivered", "failed", "stopped"
DELIVERY_STATES = (NO_DELIVERY, PENDING, DELIVERED, GAVE_UP, STOPPED)

ID_PREFIX = "job_"
_ID = re.compile(r"job_[A-Za-z0-9_-]{32}")  # 24 random bytes, URL-safe base64: 192 bits

Pairs = tuple[tuple[str, str], ...]


class InvalidTransition(Exception):
    """A state change the life of a job does not allow (a bug, or a race another process won)."""


STORES = ("sqlite", "redis")


@dataclass(frozen=True, slots=True)
class JobsConfig:
    """The ``[jobs]`` section: where jobs are kept, how many run, how long results live, how
    deliveries are retried. A TOML file turns jobs on by having the table."""

    enabled: bool = False
    # Where clients reach Parkway from outside, public prefix included ("https://app.example.com/ai"):
    # job URLs (the 202, status documents, webhooks) are <public_url>/jobs/<id>, never built from
    # a request's Host, which the client chooses. Required when jobs are on.
    public_url: str = ""
    store: str = "sqlite"  # sqlite | redis (the [state] Redis: its url and key_prefix)
    path: str = "parkway-jobs.sqlite3"  # the SQLite file
    max_jobs_in_flight: int = 16  # upstream calls this process runs at once
    max_jobs_queued: int = 1000  # jobs waiting in the store; past it 503 + Retry-After
    result_ttl: float = 86400.0  # seconds a finished job (and its answer) can be read
    retry_schedule: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)  # between deliveries
    max_delivery_age: float = 86400.0  # no delivery attempt later than this after the first
    delivery_timeout: float = 15.0  # one delivery attempt, answer included
    lease: float = 30.0  # a job held by a process that stopped renewing is taken over after this
    max_attempts: int = 3  # upstream runs of one job (a run cut by a crash counts)
    max_result_bytes: int = 16 * 1024 * 1024  # a larger answer fails the job
    inline_payload_bytes: int = 256 * 1024  # larger answers are linked from the webhook, not inlined
    poll_interval: float = 1.0  # how often the store is asked for work other processes queued
    purge_interval: float = 60.0  # how often expired jobs (prompt and answer) are deleted from the store
    async_param: str = "pw_async"  # signed parameter allowing Prefer: respond-async
    callback_param: str = "pw_callback"  # signed parameter naming where to deliver

    def __post_init__(self) -> None:
        if self.store not in STORES:
            raise ValueError(f"store must be one of {', '.join(STORES)}")

    @property
    def schedule(self) -> RetrySchedule:
        return RetrySchedule(self.retry_schedule, self.max_delivery_age)


def credential_job_limits(
    settings: JobsConfig, *, max_queued: int | None, max_running: int | None, credentials: int
) -> tuple[int, int]:
    """(jobs one credential may have queued, jobs of it one process runs at once).

    Unset, each is the credential's share of the global limit (``max_jobs_queued`` and
    ``max_jobs_in_flight`` divided by the number of credentials), so one tenant filling its
    share leaves every other one its own. Set, they may add up to more than the global limits,
    which still hold.
    """
    share = max(1, credentials)
    queued = max_queued if max_queued is not None else max(1, settings.max_jobs_queued // share)
    running = max_running if max_running is not None else max(1, -(-settings.max_jobs_in_flight // share))
    return queued, running


def new_job_id() -> str:
    """An unguessable id (192 random bits): it is the capability to read and cancel the job."""
    return ID_PREFIX + secrets.token_urlsafe(24)


def new_webhook_id() -> str:
    """The ``webhook-id`` of a job's delivery: its own random value, so logging it at the
    receiver does not hand out the job id's capability."""
    return "msg_" + secrets.token_urlsafe(18)


def valid_job_id(text: str) -> bool:
    """Whether ``text`` has the shape of a job id (anything else is 404 without a lookup)."""
    return _ID.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class JobRequest:
    """The upstream request to make: the credential's headers are added when it runs, so no
    injected secret is ever written to the store."""

    method: str
    url: str
    headers: Pairs = ()
    body: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class JobResult:
    """The upstream's answer, whole (a streamed answer is stored as the bytes it streamed)."""

    status: int
    headers: Pairs = ()
    body: bytes = field(default=b"", repr=False)

    @property
    def content_type(self) -> str:
        return next((v for n, v in self.headers if n.lower() == "content-type"), "")


@dataclass(frozen=True, slots=True)
class JobError:
    code: str  # a ParkwayError code, e.g. upstream_timeout
    message: str


@dataclass(frozen=True, slots=True)
class Delivery:
    state: str = NO_DELIVERY
    attempts: int = 0
    next_at: float | None = None  # when the next attempt is due (pending only)
    first_at: float | None = None  # when delivery became due: the max age counts from here
    last_status: int | None = None  # HTTP status of the last attempt; None = no answer
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    credential: str
    created_at: float
    request: JobRequest
    status_url: str  # absolute: [jobs] public_url + /jobs/<id>
    webhook_id: str
    callback: str | None = None
    user: str | None = None
    status: str = QUEUED
    attempts: int = 0  # upstream runs started (a run cut by a crash counts)
    owner: str | None = None  # the runner holding it while in_progress
    lease_until: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result: JobResult | None = None
    error: JobError | None = None
    delivery: Delivery = Delivery()
    expires_at: float | None = None  # a terminal job is forgotten after this

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def new_job(
    *,
    credential: str,
    request: JobRequest,
    status_url_prefix: str,
    callback: str | None,
    user: str | None,
    now: float,
    job_id: str | None = None,
) -> Job:
    """A queued job; its status URL is ``status_url_prefix`` + ``/`` + its id."""
    job_id = job_id or new_job_id()
    return Job(
        id=job_id,
        credential=credential,
        created_at=now,
        request=request,
        status_url=f"{status_url_prefix.rstrip('/')}/{job_id}",
        webhook_id=new_webhook_id(),
        callback=callback,
        user=user,
    )


# --- state changes --------------------------------------------------------------------------------

_NEXT: Mapping[str, frozenset[str]] = {
    QUEUED: frozenset({IN_PROGRESS, CANCELLED}),
    IN_PROGRESS: frozenset({IN_PROGRESS, QUEUED, COMPLETED, FAILED, CANCELLED}),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


def _move(job: Job, status: str, **changes: Any) -> Job:
    if status not in _NEXT[job.status]:
        raise InvalidTransition(f"job {job.id[:12]}… cannot go from {job.status} to {status}")
    return replace(job, status=status, **changes)


def claimed(job: Job, owner: str, *, now: float, lease: float) -> Job:
    """Taken by runner ``owner`` for ``lease`` seconds: a queued job, or one whose holder's
    lease ran out (its process died) and which therefore runs again."""
    if job.status == IN_PROGRESS and (job.lease_until or 0) > now:
        raise InvalidTransition(f"job {job.id[:12]}… is held by a live runner")
    return _move(job, IN_PROGRESS, attempts=job.attempts + 1, owner=owner, lease_until=now + lease, started_at=now)


def _finished(job: Job, status: str, now: float, result_ttl: float, **changes: Any) -> Job:
    delivery = job.delivery
    if job.callback is not None:
        delivery = Delivery(PENDING, next_at=now, first_at=now)
    return _move(
        job, status, owner=None, lease_until=None, finished_at=now, expires_at=now + result_ttl,
        delivery=delivery, **changes,
    )  # fmt: skip


def completed(job: Job, result: JobResult, *, now: float, result_ttl: float) -> Job:
    return _finished(job, COMPLETED, now, result_ttl, result=result)


def failed(job: Job, error: JobError, *, now: float, result_ttl: float) -> Job:
    return _finished(job, FAILED, now, result_ttl, error=error)


def cancelled(job: Job, *, now: float, result_ttl: float) -> Job:
    return _finished(job, CANCELLED, now, result_ttl)


def requeued(job: Job) -> Job:
    """Given back unfinished (drain): queued again for the next runner, attempt kept."""
    return _move(job, QUEUED, owner=None, lease_until=None)


def released(job: Job) -> Job:
    """Given back before its run began (its credential or user was at ``max_concurrent``): queued
    again in its place, the claim not counted as an attempt."""
    if job.status != IN_PROGRESS:
        raise InvalidTransition(f"job {job.id[:12]}… is {job.status}, not claimed")
    return _move(job, QUEUED, owner=None, lease_until=None, attempts=max(0, job.attempts - 1), started_at=None)


# --- delivery schedule ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """Seconds between delivery attempts (the spec's: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h),
    bounded by ``max_age`` seconds since the first attempt."""

    delays: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    max_age: float = 86400.0


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """What one delivery attempt came to: ``status`` None when no answer arrived."""

    status: int | None
    retry_after: str | None = None  # the receiver's Retry-After header, as sent
    error: str | None = None
    permanent: bool = False  # retrying cannot help (the callback's address is refused)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date, RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def after_attempt(job: Job, outcome: AttemptOutcome, *, now: float, schedule: RetrySchedule) -> Job:
    """The job's delivery after one attempt: delivered (2xx), stopped (410), retried on the
    schedule (429/503 honour Retry-After), or given up once the schedule or max age runs out."""
    d = job.delivery
    if d.state != PENDING:
        raise InvalidTransition(f"delivery of job {job.id[:12]}… is {d.state}, not pending")
    attempts = d.attempts + 1
    base = replace(d, attempts=attempts, last_status=outcome.status, last_error=outcome.error)
    if outcome.status is not None and 200 <= outcome.status < 300:
        return replace(job, delivery=replace(base, state=DELIVERED, next_at=None))
    if outcome.status == 410:
        return replace(job, delivery=replace(base, state=STOPPED, next_at=None))
    if outcome.permanent:
        return replace(job, delivery=replace(base, state=GAVE_UP, next_at=None))
    first = d.first_at if d.first_at is not None else now
    wait: float | None = None
    if outcome.status in (429, 503):
        wait = parse_retry_after(outcome.retry_after, now)
    if wait is None:
        wait = schedule.delays[attempts - 1] if attempts - 1 < len(schedule.delays) else None
    if wait is None or now + wait > first + schedule.max_age:
        return replace(job, delivery=replace(base, state=GAVE_UP, next_at=None))
    return replace(job, delivery=replace(base, next_at=now + wait))


# --- what clients and receivers see -------------------------------------------------------------


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _header_object(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def response_url(job: Job) -> str:
    """Where the stored answer is replayed as the upstream sent it."""
    return f"{job.status_url}?stream=true"


def status_document(job: Job, *, inline_limit: int | None = None, include_body: bool = True) -> dict[str, Any]:
    """The JSON of ``GET /jobs/<id>`` and of a delivery's ``data``; the answer's body inline
    (text, or ``body_base64`` when not UTF-8) up to ``inline_limit`` bytes, else a link.
    ``include_body=False`` leaves the inline body out (:func:`status_document_chunks` adds it)."""
    doc: dict[str, Any] = {
        "id": job.id,
        "object": "job",
        "status": job.status,
        "status_url": job.status_url,
        "created_at": _iso(job.created_at),
        "finished_at": _iso(job.finished_at),
        "attempts": job.attempts,
    }
    if job.result is not None:
        r = job.result
        response: dict[str, Any] = {"status": r.status, "headers": _header_object(r.headers)}
        if inline_limit is not None and len(r.body) > inline_limit:
            response["body_url"] = response_url(job)
            response["body_bytes"] = len(r.body)
        elif include_body:
            try:
                response["body"] = r.body.decode("utf-8")
            except UnicodeDecodeError:
                response["body_base64"] = base64.b64encode(r.body).decode()
        doc["response"] = response
    if job.error is not None:
        doc["error"] = {"code": job.error.code, "message": job.error.message}
    return doc


def _dumps(document: object) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def _is_utf8(data: bytes, chunk_bytes: int) -> bool:
    """Whether ``data`` is UTF-8, checked piece by piece (no second copy of it as text)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for i in range(0, len(data), chunk_bytes):
            decoder.decode(data[i : i + chunk_bytes])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def status_document_chunks(job: Job, *, chunk_bytes: int = 65536) -> Iterator[bytes]:
    """:func:`status_document` as JSON bytes, in pieces of about ``chunk_bytes``: the answer's body
    is encoded piece by piece as they are sent, so a large answer is never held a second and a
    third time (as text, then as JSON), and a reader that stops reading holds one piece.

    The pieces joined are exactly the JSON of :func:`status_document`.
    """
    result = job.result
    if result is None or job.error is not None:
        yield _dumps(status_document(job))
        return
    head = _dumps(status_document(job, include_body=False))  # the response object comes last
    body = result.body
    text = _is_utf8(body, chunk_bytes)
    yield head[:-2] + (b',"body":"' if text else b',"body_base64":"')
    if text:
        decoder = codecs.getincrementaldecoder("utf-8")()
        for i in range(0, len(body), chunk_bytes):
            piece = decoder.decode(body[i : i + chunk_bytes], final=i + chunk_bytes >= len(body))
            yield json.dumps(piece, ensure_ascii=False)[1:-1].encode()
    else:
        step = max(3, chunk_bytes // 4 * 3)  # whole base64 quanta: the pieces join without padding
        for i in range(0, len(body), step):
            yield base64.b64encode(body[i : i + step])
    yield b'"}}'


def accepted_document(job: Job) -> dict[str, Any]:
    """The body of the ``202 Accepted`` that answers a background request."""
    return {"id": job.id, "object": "job", "status": job.status, "status_url": job.status_url}


def webhook_payload(job: Job, *, inline_limit: int) -> bytes:
    """The body POSTed to the callback (Standard Webhooks' ``type``/``timestamp``/``data``).

    Built from the terminal record alone, so every attempt sends the same bytes.
    """
    if not job.terminal:
        raise InvalidTransition(f"job {job.id[:12]}… is {job.status}: nothing to deliver yet")
    payload = {
        "type": f"job.{job.status}",
        "timestamp": _iso(job.finished_at),
        "data": status_document(job, inline_limit=inline_limit),
    }
    return _dumps(payload)


_EVENT = re.compile(rb".*?(?:\n\n|\r\n\r\n)|.+", re.DOTALL)


def replay_chunks(result: JobResult, chunk_bytes: int = 65536) -> Iterator[bytes]:
    """A stored answer cut where it was written: an event stream by its events (blank line
    after each), anything else in ``chunk_bytes`` pieces; made as they are sent, not all at once."""
    body = result.body
    if "text/event-stream" in result.content_type.lower():
        for event in _EVENT.finditer(body):
            yield event.group()
        return
    for i in range(0, len(body), chunk_bytes):
        yield body[i : i + chunk_bytes]
