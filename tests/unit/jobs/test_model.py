"""The pure life of a job (proxy.jobs.model): transitions, the delivery schedule, what is shown."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import pytest

from proxy.jobs import model as jobs
from proxy.jobs.model import AttemptOutcome, InvalidTransition, JobError, JobRequest, JobResult, RetrySchedule

NOW = 1_800_000_000.0
TTL = 3600.0
SCHEDULE = RetrySchedule(delays=(5, 300, 1800), max_age=3600)


def make_job(callback: str | None = "https://app.example.com/hooks/parkway", **changes) -> jobs.Job:
    job = jobs.new_job(
        credential="app",
        request=JobRequest(
            "POST", "https://api.example.com/v1/chat/completions", (("content-type", "application/json"),), b"{}"
        ),
        status_url_prefix="https://parkway.example.com/ai/jobs/",
        callback=callback,
        user="alice",
        now=NOW,
    )
    return replace(job, **changes)


def test_ids_are_unguessable_and_shaped() -> None:
    ids = {jobs.new_job_id() for _ in range(1000)}
    assert len(ids) == 1000
    for job_id in list(ids)[:20]:
        assert jobs.valid_job_id(job_id)
        assert len(base64.urlsafe_b64decode(job_id[4:] + "==")) * 8 >= 128
    assert not jobs.valid_job_id("job_short")
    assert not jobs.valid_job_id("../../etc/passwd")
    assert not jobs.valid_job_id(jobs.new_job_id() + "x")
    job = make_job()
    assert job.status_url == f"https://parkway.example.com/ai/jobs/{job.id}"
    assert job.webhook_id.startswith("msg_") and job.id[4:] not in job.webhook_id


def test_the_happy_life() -> None:
    job = make_job()
    running = jobs.claimed(job, "runner-1", now=NOW + 1, lease=30)
    assert (running.status, running.attempts, running.owner, running.lease_until) == (
        "in_progress",
        1,
        "runner-1",
        NOW + 31,
    )
    result = JobResult(200, (("content-type", "application/json"),), b'{"ok":true}')
    done = jobs.completed(running, result, now=NOW + 2, result_ttl=TTL)
    assert done.status == "completed" and done.terminal and done.owner is None and done.lease_until is None
    assert done.expires_at == NOW + 2 + TTL
    assert done.delivery == jobs.Delivery(jobs.PENDING, next_at=NOW + 2, first_at=NOW + 2)


def test_without_callback_nothing_is_delivered() -> None:
    done = jobs.failed(
        jobs.claimed(make_job(callback=None), "r", now=NOW, lease=30),
        JobError("upstream_timeout", "slow"),
        now=NOW,
        result_ttl=TTL,
    )
    assert done.status == "failed" and done.delivery.state == jobs.NO_DELIVERY


@pytest.mark.parametrize(
    ("status", "move"),
    [
        ("completed", lambda j: jobs.claimed(j, "r", now=NOW, lease=30)),
        ("cancelled", lambda j: jobs.cancelled(j, now=NOW, result_ttl=TTL)),
        ("failed", lambda j: jobs.requeued(j)),
        ("queued", lambda j: jobs.completed(j, JobResult(200), now=NOW, result_ttl=TTL)),
        ("queued", lambda j: jobs.requeued(j)),
    ],
)
def test_transitions_the_life_does_not_allow(status: str, move) -> None:
    with pytest.raises(InvalidTransition):
        move(make_job(status=status))


def test_a_live_lease_cannot_be_taken_but_an_expired_one_can() -> None:
    running = jobs.claimed(make_job(), "dead-process", now=NOW, lease=30)
    with pytest.raises(InvalidTransition, match="live runner"):
        jobs.claimed(running, "other", now=NOW + 29, lease=30)
    again = jobs.claimed(running, "other", now=NOW + 30, lease=30)
    assert (again.owner, again.attempts) == ("other", 2)


def test_cancel_from_queued_and_running_and_requeue_on_drain() -> None:
    assert jobs.cancelled(make_job(), now=NOW, result_ttl=TTL).status == "cancelled"
    running = jobs.claimed(make_job(), "r", now=NOW, lease=30)
    assert jobs.cancelled(running, now=NOW, result_ttl=TTL).delivery.state == jobs.PENDING
    back = jobs.requeued(running)
    assert (back.status, back.owner, back.attempts) == ("queued", None, 1)


# --- delivery schedule -------------------------------------------------------------------------


def pending(first_at: float = NOW) -> jobs.Job:
    return jobs.completed(
        jobs.claimed(make_job(), "r", now=first_at, lease=30), JobResult(200), now=first_at, result_ttl=TTL
    )


@pytest.mark.parametrize(
    ("outcomes", "state", "next_at"),
    [
        ([AttemptOutcome(204)], "delivered", None),
        ([AttemptOutcome(200)], "delivered", None),
        ([AttemptOutcome(410)], "stopped", None),
        ([AttemptOutcome(500)], "pending", NOW + 5),
        ([AttemptOutcome(None, error="refused")], "pending", NOW + 5),
        ([AttemptOutcome(500), AttemptOutcome(500)], "pending", NOW + 300),
        ([AttemptOutcome(429, "120")], "pending", NOW + 120),
        ([AttemptOutcome(503, "Fri, 15 Jan 2027 08:00:10 GMT")], "pending", NOW + 10),  # an HTTP-date
        ([AttemptOutcome(429, "soon")], "pending", NOW + 5),  # unreadable: the schedule
        ([AttemptOutcome(500, "120")], "pending", NOW + 5),  # Retry-After only for 429/503
        ([AttemptOutcome(500)] * 4, "failed", None),  # the schedule ran out
        ([AttemptOutcome(429, "7200")], "failed", None),  # beyond the max age
        ([AttemptOutcome(None, error="address refused", permanent=True)], "failed", None),
    ],
)
def test_delivery_outcomes(outcomes: list[AttemptOutcome], state: str, next_at: float | None) -> None:
    job = pending()
    for outcome in outcomes:
        job = jobs.after_attempt(job, outcome, now=NOW, schedule=SCHEDULE)
    assert job.delivery.state == state
    assert job.delivery.attempts == len(outcomes)
    assert job.delivery.last_status == outcomes[-1].status
    if next_at is not None or state != "pending":
        assert job.delivery.next_at == next_at


def test_retry_after_as_an_http_date() -> None:
    from datetime import UTC, datetime

    date_now = datetime(2027, 1, 15, 8, 0, 0, tzinfo=UTC).timestamp()
    assert jobs.parse_retry_after("Fri, 15 Jan 2027 08:00:10 GMT", date_now) == 10.0
    assert jobs.parse_retry_after("Fri, 15 Jan 2027 07:00:00 GMT", date_now) == 0.0
    assert jobs.parse_retry_after("", date_now) is None
    assert jobs.parse_retry_after("-5", date_now) is None


def test_max_age_counts_from_the_first_attempt() -> None:
    job = pending(first_at=NOW)
    later = NOW + 3500
    job = jobs.after_attempt(job, AttemptOutcome(500), now=later, schedule=SCHEDULE)
    assert job.delivery.next_at == later + 5  # still inside the hour
    job = jobs.after_attempt(job, AttemptOutcome(500), now=later + 5, schedule=SCHEDULE)
    assert job.delivery.state == "failed"  # 300 s more would pass the hour


def test_after_attempt_needs_a_pending_delivery() -> None:
    delivered = jobs.after_attempt(pending(), AttemptOutcome(200), now=NOW, schedule=SCHEDULE)
    with pytest.raises(InvalidTransition):
        jobs.after_attempt(delivered, AttemptOutcome(200), now=NOW, schedule=SCHEDULE)


# --- documents ---------------------------------------------------------------------------------


def test_status_document_and_payload() -> None:
    result = JobResult(200, (("Content-Type", "application/json"), ("X-A", "1"), ("x-a", "2")), '{"t":"é"}'.encode())
    job = jobs.completed(jobs.claimed(make_job(), "r", now=NOW, lease=30), result, now=NOW + 1, result_ttl=TTL)
    doc = jobs.status_document(job)
    assert doc["status"] == "completed" and doc["id"] == job.id and doc["attempts"] == 1
    assert doc["response"] == {
        "status": 200,
        "headers": {"content-type": "application/json", "x-a": "1, 2"},
        "body": '{"t":"é"}',
    }
    assert doc["created_at"] == "2027-01-15T08:00:00Z"
    payload = json.loads(jobs.webhook_payload(job, inline_limit=1000))
    assert payload["type"] == "job.completed" and payload["timestamp"] == "2027-01-15T08:00:01Z"
    assert payload["data"] == doc
    assert jobs.webhook_payload(job, inline_limit=1000) == jobs.webhook_payload(job, inline_limit=1000)
    # above the size limit the answer is linked, not inlined
    linked = json.loads(jobs.webhook_payload(job, inline_limit=4))["data"]["response"]
    assert "body" not in linked and linked["body_url"] == job.status_url + "?stream=true" and linked["body_bytes"] == 10
    assert jobs.accepted_document(job).keys() == {"id", "object", "status", "status_url"}


def test_binary_answer_and_error_documents() -> None:
    running = jobs.claimed(make_job(), "r", now=NOW, lease=30)
    binary = jobs.completed(running, JobResult(200, (), b"\xff\x00"), now=NOW, result_ttl=TTL)
    assert jobs.status_document(binary)["response"]["body_base64"] == "/wA="
    failed = jobs.failed(running, JobError("upstream_timeout", "api.example.com timed out"), now=NOW, result_ttl=TTL)
    assert jobs.status_document(failed)["error"] == {"code": "upstream_timeout", "message": "api.example.com timed out"}
    with pytest.raises(InvalidTransition):
        jobs.webhook_payload(running, inline_limit=10)


def test_replay_chunks_cut_an_event_stream_by_event() -> None:
    sse = JobResult(200, (("content-type", "text/event-stream"),), b"data: a\n\ndata: b\n\ndata: [DONE]\n\n")
    assert list(jobs.replay_chunks(sse)) == [b"data: a\n\n", b"data: b\n\n", b"data: [DONE]\n\n"]
    plain = JobResult(200, (("content-type", "application/json"),), b"x" * 10)
    assert list(jobs.replay_chunks(plain, chunk_bytes=4)) == [b"xxxx", b"xxxx", b"xx"]
    assert list(jobs.replay_chunks(JobResult(204))) == []
    crlf = JobResult(
        200,
        (
            (
                "content-type",
                "text/event-stream",
            ),
        ),
        b"data: a\r\n\r\n\n\ndata: b",
    )
    assert list(jobs.replay_chunks(crlf)) == [b"data: a\r\n\r\n", b"\n\n", b"data: b"]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"plain",
        'h\u00e9llo \u20ac \U0001f600 "quoted" \\ \n\t\x01'.encode() * 3000,
        bytes(range(256)) * 700,
        b"\xe2\x82" + b"x" * 70000,
    ],
)
@pytest.mark.parametrize("chunk_bytes", [4, 65536])
def test_status_document_chunks_join_into_the_status_document(body: bytes, chunk_bytes: int) -> None:
    """Streamed piece by piece (a multi-byte character or a base64 quantum cut across pieces),
    the document is byte for byte the one built whole."""
    job = jobs.completed(
        jobs.claimed(make_job(), "r", now=NOW, lease=30), JobResult(200, (("x", "1"),), body), now=NOW, result_ttl=60
    )
    whole = json.dumps(jobs.status_document(job), ensure_ascii=False, separators=(",", ":")).encode()
    pieces = list(jobs.status_document_chunks(job, chunk_bytes=chunk_bytes))
    assert b"".join(pieces) == whole
    assert all(len(p) <= 6 * chunk_bytes for p in pieces[1:])  # the body a piece at a time (\\u0001 is 6 bytes)
    failed = jobs.failed(jobs.claimed(make_job(), "r", now=NOW, lease=30), JobError("c", "m"), now=NOW, result_ttl=60)
    assert (
        b"".join(jobs.status_document_chunks(failed))
        == json.dumps(jobs.status_document(failed), ensure_ascii=False, separators=(",", ":")).encode()
    )


def test_config_checks_its_store() -> None:
    with pytest.raises(ValueError, match="store must be one of sqlite, redis"):
        jobs.JobsConfig(store="postgres")
    assert jobs.JobsConfig().schedule == RetrySchedule()


@pytest.mark.parametrize(
    ("queued", "running", "credentials", "expected"),
    [
        (None, None, 1, (1000, 16)),  # alone: the whole of the global limits
        (None, None, 2, (500, 8)),  # each its share, so one cannot take the other's
        (None, None, 3, (333, 6)),  # running rounds up, queued down: the global bounds still hold
        (None, None, 5000, (1, 1)),
        (50, 2, 3, (50, 2)),  # set per credential
    ],
)
def test_credential_job_limits(
    queued: int | None, running: int | None, credentials: int, expected: tuple[int, int]
) -> None:
    settings = jobs.JobsConfig(max_jobs_queued=1000, max_jobs_in_flight=16)
    assert jobs.credential_job_limits(settings, max_queued=queued, max_running=running, credentials=credentials) == (
        expected
    )


def test_a_released_job_is_queued_again_without_counting_the_claim() -> None:
    job = make_job()
    running = jobs.claimed(job, "r", now=NOW, lease=30)
    back = jobs.released(running)
    assert back.status == "queued" and back.attempts == 0 and back.owner is None and back.lease_until is None
    with pytest.raises(InvalidTransition):
        jobs.released(job)
