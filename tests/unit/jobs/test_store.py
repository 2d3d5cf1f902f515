"""Job stores (proxy.jobs.store and its two backends), one contract run against each.

SQLite runs on real files in ``tmp_path``; Redis on a real ``redis-server``. "Two runners" are
two store objects (two connections) on the same file or server, as two processes would have.
"""

from __future__ import annotations

import base64
import gc
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import coredis
import pytest
import trio

from proxy.jobs import model as jobs
from proxy.jobs.model import AttemptOutcome, JobError, JobRequest, JobResult, RetrySchedule
from proxy.jobs.redis import RedisJobStore
from proxy.jobs.sqlite import SQLiteJobStore
from proxy.jobs.store import Cancellation, JobStore, QueueFull, index_of, job_from_json, job_to_json
from support.redis import RedisServer

NOW = 1_800_000_000.0
TTL = 600.0
GUARD = 10.0


def make_job(n: int = 0, *, callback: str | None = None, body: bytes = b'{"n":0}', credential: str = "app") -> jobs.Job:
    return jobs.new_job(
        credential=credential,
        request=JobRequest("POST", "http://127.0.0.1:1/v1/x", (("content-type", "application/json"),), body),
        status_url_prefix="http://parkway/jobs",
        callback=callback,
        user=None,
        now=NOW + n,
    )


def test_record_round_trip_keeps_every_field() -> None:
    job = make_job(callback="http://app/hooks", body=bytes(range(256)))
    running = jobs.claimed(job, "r", now=NOW, lease=30)
    done = jobs.completed(running, JobResult(201, (("a", "1"), ("a", "2")), b"\x00\xff"), now=NOW + 1, result_ttl=TTL)
    done = jobs.after_attempt(done, AttemptOutcome(503, "7", error="x"), now=NOW + 2, schedule=RetrySchedule())
    failed = jobs.failed(running, JobError("c", "m"), now=NOW, result_ttl=TTL)
    for record in (job, running, done, failed):
        assert job_from_json(job_to_json(record)) == record
    with pytest.raises(ValueError, match="unreadable job record"):
        job_from_json(b'{"id": "x"}')
    held = replace(job, budget={"ledger": "memory:a", "budgets": [], "input_tokens": 1, "output_tokens": 2})
    assert job_from_json(job_to_json(held)) == held
    older = json.loads(job_to_json(job))  # a record written before jobs were settled has no "budget"
    assert "budget" not in older and job_from_json(json.dumps(older)).budget is None
    assert index_of(done).delivery_at == NOW + 9 and index_of(done).expires_at is None
    assert index_of(failed).expires_at is None  # kept while its delivery may run
    quiet = jobs.failed(jobs.claimed(make_job(), "r", now=NOW, lease=30), JobError("c", "m"), now=NOW, result_ttl=TTL)
    assert index_of(quiet).expires_at == NOW + TTL and index_of(job).queued_at == NOW


class Backend:
    """One backing store (a SQLite file or a Redis server); ``open()`` gives one more store object
    on it, as another process would have. Stores are entered and left in the test's own task."""

    def __init__(self, kind: str, tmp_path: Path, redis: RedisServer | None):
        self.kind, self.tmp_path, self.redis = kind, tmp_path, redis

    def open(self) -> SQLiteJobStore | RedisJobStore:
        if self.redis is not None:
            return RedisJobStore(self.redis.url, key_prefix="t:")
        return SQLiteJobStore(self.tmp_path / "jobs.sqlite3")


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Backend]:
    server: RedisServer | None = None
    if request.param == "redis":
        server = RedisServer(nursery, tmp_path)
        with trio.fail_after(GUARD):
            await server.start()
    yield Backend(request.param, tmp_path, server)
    if server is not None:
        await server.kill()
    gc.collect()


async def test_add_get_and_the_queue_bound(backend: Backend) -> None:
    async with backend.open() as store:
        first, second, third = make_job(0), make_job(1), make_job(2)
        await store.add(first, max_queued=2)
        await store.add(second, max_queued=2)
        with pytest.raises(QueueFull):
            await store.add(third, max_queued=2)
        assert await store.get(first.id, now=NOW) == first
        assert await store.get(third.id, now=NOW) is None  # refused, so never stored
        assert await store.get(jobs.new_job_id(), now=NOW) is None


async def test_each_credential_has_its_own_queue_bound(backend: Backend) -> None:
    """One tenant filling its share leaves the other able to queue (issue 19)."""
    async with backend.open() as store:
        for n in range(2):
            await store.add(make_job(n, credential="greedy"), max_queued=10, max_queued_credential=2)
        with pytest.raises(QueueFull) as caught:
            await store.add(make_job(2, credential="greedy"), max_queued=10, max_queued_credential=2)
        assert "credential 'greedy'" in caught.value.message and "max_jobs_queued = 2" in caught.value.message
        await store.add(make_job(3, credential="other"), max_queued=10, max_queued_credential=2)
        # a claimed job no longer counts as queued: its credential may queue another
        claimed = await store.claim("r", now=NOW, lease=30, skip_credentials={"other"})
        assert claimed is not None and claimed.credential == "greedy"
        await store.add(make_job(4, credential="greedy"), max_queued=10, max_queued_credential=2)


async def test_claims_pass_over_skipped_credentials_and_ids(backend: Backend) -> None:
    async with backend.open() as store:
        a0, a1, b0 = make_job(0, credential="a"), make_job(1, credential="a"), make_job(2, credential="b")
        for job in (a0, a1, b0):
            await store.add(job, max_queued=10)
        first = await store.claim("r", now=NOW, lease=30, skip_credentials={"a"})
        assert first is not None and first.id == b0.id
        assert await store.claim("r", now=NOW, lease=30, skip_credentials={"a", "b"}) is None
        second = await store.claim("r", now=NOW, lease=30, skip_ids={a0.id})
        assert second is not None and second.id == a1.id
        # given back before it ran: queued again in its place, the claim not counted
        assert await store.finish(jobs.released(second), "r")
        again = await store.claim("r", now=NOW, lease=30)
        assert again is not None and again.id == a0.id
        third = await store.claim("r", now=NOW, lease=30)
        assert third is not None and third.id == a1.id and third.attempts == 1


async def test_claims_are_fifo_and_exclusive_between_runners(backend: Backend) -> None:
    async with backend.open() as a, backend.open() as b:
        queued = [make_job(i) for i in range(6)]
        for job in queued:
            await a.add(job, max_queued=100)
        claimed: list[tuple[str, jobs.Job]] = []

        async def runner(store: JobStore, owner: str) -> None:
            while job := await store.claim(owner, now=NOW + 10, lease=30):
                claimed.append((owner, job))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner, a, "a")
            nursery.start_soon(runner, b, "b")
        ids = [job.id for _, job in claimed]
        assert sorted(ids) == sorted(j.id for j in queued) and len(ids) == 6  # each exactly once
        for owner, job in claimed:
            stored = await a.get(job.id, now=NOW + 10)
            assert stored is not None and stored.status == "in_progress" and stored.owner == owner
            assert stored.lease_until == NOW + 40 and stored.attempts == 1
        # one runner alone takes them in creation order
        async with backend.open() as c:
            later = [make_job(100 + i) for i in range(3)]
            for job in reversed(later):
                await c.add(job, max_queued=100)
            order = [(await c.claim("c", now=NOW + 20, lease=30)).id for _ in range(3)]  # type: ignore[union-attr]
            assert order == [j.id for j in later]


async def test_a_dead_runners_job_is_reclaimed_after_its_lease(backend: Backend) -> None:
    async with backend.open() as dead, backend.open() as alive:
        job = make_job()
        await dead.add(job, max_queued=10)
        taken = await dead.claim("dead", now=NOW, lease=30)
        assert taken is not None
        assert await alive.claim("alive", now=NOW + 29, lease=30) is None  # lease still running
        assert await dead.renew(job.id, "dead", until=NOW + 60)
        assert await alive.claim("alive", now=NOW + 59, lease=30) is None
        again = await alive.claim("alive", now=NOW + 61, lease=30)  # it stopped renewing
        assert again is not None and again.owner == "alive" and again.attempts == 2
        # the dead runner, were it only slow, has lost it: it can neither renew nor finish
        assert not await dead.renew(job.id, "dead", until=NOW + 100)
        done = jobs.completed(taken, JobResult(200), now=NOW + 62, result_ttl=TTL)
        assert not await dead.finish(done, "dead")
        assert await alive.finish(jobs.completed(again, JobResult(200), now=NOW + 62, result_ttl=TTL), "alive")


async def test_finish_requeue_and_cancel(backend: Backend) -> None:
    async with backend.open() as store:
        first, second = make_job(0, callback="http://app/h"), make_job(1)
        await store.add(first, max_queued=10)
        await store.add(second, max_queued=10)
        running = await store.claim("r", now=NOW, lease=30)
        assert running is not None and running.id == first.id
        # drain: back to the queue, still first in line
        assert await store.finish(jobs.requeued(running), "r")
        again = await store.claim("r2", now=NOW + 1, lease=30)
        assert again is not None and again.id == first.id and again.attempts == 2
        # cancelled while running: the runner's renew and finish now fail
        cancel = await store.cancel(first.id, now=NOW + 2, result_ttl=TTL)
        assert cancel is not None and (cancel.was, cancel.dequeued) == ("in_progress", False)
        cancelled = cancel.job
        assert cancelled.status == "cancelled" and cancelled.delivery.state == "pending"
        assert not await store.renew(first.id, "r2", until=NOW + 50)
        assert not await store.finish(jobs.completed(again, JobResult(200), now=NOW + 3, result_ttl=TTL), "r2")
        # cancelling a terminal job changes nothing; an unknown one is None
        assert await store.cancel(first.id, now=NOW + 4, result_ttl=TTL) == Cancellation(cancelled, None)
        assert await store.cancel(jobs.new_job_id(), now=NOW, result_ttl=TTL) is None
        # a queued job cancelled is no longer claimable
        dequeued = await store.cancel(second.id, now=NOW + 5, result_ttl=TTL)
        assert dequeued is not None and dequeued.job.status == "cancelled" and dequeued.dequeued
        assert await store.claim("r", now=NOW + 6, lease=30) is None


async def test_only_the_cancel_that_takes_a_job_out_of_the_queue_says_so(backend: Backend) -> None:
    """A DELETE gives a queued job's budget hold back only when this very call dequeued it."""
    async with backend.open() as store:
        job = replace(make_job(0), budget={"kept": "in the record"})
        await store.add(job, max_queued=10)
        first = await store.cancel(job.id, now=NOW + 1, result_ttl=TTL)
        assert first is not None and (first.was, first.dequeued) == ("queued", True)
        assert first.job.budget == job.budget and first.job.attempts == 0
        again = await store.cancel(job.id, now=NOW + 2, result_ttl=TTL)
        assert again is not None and (again.was, again.dequeued) == (None, False) and again.job == first.job
        # a job given back to the queue by a drain (attempts kept) is dequeued too; its attempt stays counted
        drained = make_job(1)
        await store.add(drained, max_queued=10)
        running = await store.claim("r", now=NOW + 3, lease=30)
        assert running is not None and await store.finish(jobs.requeued(running), "r")
        cancel = await store.cancel(drained.id, now=NOW + 4, result_ttl=TTL)
        assert cancel is not None and cancel.dequeued and cancel.job.attempts == 1


async def test_a_cancel_and_a_claim_of_one_queued_job_dequeue_it_once(backend: Backend) -> None:
    """Both orders, on two store objects (two processes): exactly one of them takes the job."""
    async with backend.open() as runner, backend.open() as api:
        claimed_first, cancelled_first = make_job(0), make_job(1)
        for job in (claimed_first, cancelled_first):
            await api.add(job, max_queued=10)
        # the runner first: the cancel finds it running
        taken = await runner.claim("r", now=NOW, lease=30)
        assert taken is not None and taken.id == claimed_first.id
        cancel = await api.cancel(claimed_first.id, now=NOW + 1, result_ttl=TTL)
        assert cancel is not None and (cancel.was, cancel.dequeued) == ("in_progress", False)
        # the cancel first: no runner gets it
        cancel = await api.cancel(cancelled_first.id, now=NOW + 2, result_ttl=TTL)
        assert cancel is not None and cancel.dequeued
        assert await runner.claim("r", now=NOW + 3, lease=30) is None


async def test_a_redis_claim_between_a_cancels_read_and_write_wins(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The compare-and-set decides: a claim that lands after the cancel read the job queued and
    before it wrote makes the cancel's write fail; recomputed, it cancels a running job."""
    server = RedisServer(nursery, tmp_path)
    with trio.fail_after(GUARD):
        await server.start()
    claims: list[jobs.Job | None] = []

    class Slow(RedisJobStore):
        async def _write(self, job: jobs.Job, version: str, **bounds: int | None) -> int:
            if job.status == "cancelled" and not claims:  # the cancel's first write: a runner gets in first
                async with RedisJobStore(server.url, key_prefix="t:") as runner:
                    claims.append(await runner.claim("r", now=NOW, lease=30))
            return await super()._write(job, version, **bounds)

    try:
        async with Slow(server.url, key_prefix="t:") as api:
            job = make_job(0)
            await api.add(job, max_queued=10)
            cancel = await api.cancel(job.id, now=NOW + 1, result_ttl=TTL)
            assert [c.id if c else None for c in claims] == [job.id]
            assert cancel is not None and (cancel.was, cancel.dequeued) == ("in_progress", False)
            assert cancel.job.status == "cancelled"
    finally:
        await server.kill()
        gc.collect()


async def test_deliveries_are_hidden_while_attempted_and_due_again(backend: Backend) -> None:
    async with backend.open() as a, backend.open() as b:
        job = make_job(callback="http://app/h")
        await a.add(job, max_queued=10)
        running = await a.claim("r", now=NOW, lease=30)
        assert running is not None
        assert await a.finish(jobs.completed(running, JobResult(200, (), b"ok"), now=NOW + 1, result_ttl=TTL), "r")
        assert await b.claim_delivery(now=NOW, lease=45) is None  # not due yet
        due = await a.claim_delivery(now=NOW + 1, lease=45)
        assert due is not None and due.id == job.id and due.delivery.state == "pending"
        assert await b.claim_delivery(now=NOW + 2, lease=45) is None  # hidden while a attempts it
        # a died mid-attempt: due again once the lease ends, with the same webhook id
        again = await b.claim_delivery(now=NOW + 47, lease=45)
        assert again is not None and again.webhook_id == job.webhook_id
        retry = jobs.after_attempt(again, AttemptOutcome(500), now=NOW + 47, schedule=RetrySchedule())
        await b.delivered(retry)
        assert await a.claim_delivery(now=NOW + 51, lease=45) is None
        last = await a.claim_delivery(now=NOW + 52, lease=45)
        assert last is not None and last.delivery.attempts == 1
        await a.delivered(jobs.after_attempt(last, AttemptOutcome(204), now=NOW + 52, schedule=RetrySchedule()))
        stored = await a.get(job.id, now=NOW + 53)
        assert stored is not None and stored.delivery.state == "delivered" and stored.delivery.attempts == 2
        assert await a.claim_delivery(now=NOW + 10**6, lease=45) is None


async def test_results_expire_after_their_ttl_but_not_before_delivery(backend: Backend) -> None:
    async with backend.open() as store:
        quiet, hooked = make_job(0), make_job(1, callback="http://app/h")
        for job in (quiet, hooked):
            await store.add(job, max_queued=10)
            running = await store.claim("r", now=NOW, lease=30)
            assert running is not None
            assert await store.finish(jobs.completed(running, JobResult(200), now=NOW, result_ttl=TTL), "r")
        assert await store.purge(now=NOW + TTL - 1) == 0
        assert await store.get(quiet.id, now=NOW + TTL + 1) is None  # expired reads as absent at once
        assert await store.purge(now=NOW + TTL + 1) == 1
        assert await store.get(hooked.id, now=NOW + TTL + 1) is not None  # its delivery is still pending
        due = await store.claim_delivery(now=NOW + TTL + 1, lease=45)
        assert due is not None
        await store.delivered(jobs.after_attempt(due, AttemptOutcome(200), now=NOW + TTL + 1, schedule=RetrySchedule()))
        assert await store.purge(now=NOW + TTL + 2) == 1
        assert await store.get(hooked.id, now=NOW) is None


async def test_stats(backend: Backend) -> None:
    async with backend.open() as store:
        for i in range(3):
            await store.add(make_job(i, callback="http://app/h"), max_queued=10)
        running = await store.claim("r", now=NOW + 10, lease=30)
        assert running is not None
        await store.finish(jobs.failed(running, JobError("x", "y"), now=NOW + 10, result_ttl=TTL), "r")
        await store.claim("r", now=NOW + 10, lease=30)
        stats = await store.stats(now=NOW + 10)
        assert {k: v for k, v in stats.by_status.items() if v} == {"queued": 1, "in_progress": 1, "failed": 1}
        assert stats.deliveries_pending == 1
        assert stats.oldest_queued_age == 8.0


async def test_sqlite_survives_reopening(tmp_path: Path) -> None:
    """A restart: a new store object on the same file finds the jobs, running ones included."""
    path = tmp_path / "sub" / "jobs.sqlite3"
    job = make_job()
    async with SQLiteJobStore(path) as before:
        await before.add(job, max_queued=10)
        await before.add(make_job(1), max_queued=10)
        assert await before.claim("old-process", now=NOW, lease=30) is not None
    async with SQLiteJobStore(path) as after:
        assert (await after.get(job.id, now=NOW)).status == "in_progress"  # type: ignore[union-attr]
        second = await after.claim("new-process", now=NOW + 1, lease=30)
        assert second is not None and second.id != job.id
        reclaimed = await after.claim("new-process", now=NOW + 31, lease=30)
        assert reclaimed is not None and reclaimed.id == job.id and reclaimed.attempts == 2


async def test_an_unreadable_sqlite_record_is_dropped_not_blocking(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "jobs.sqlite3"
    async with SQLiteJobStore(path) as store:
        good = make_job(1)
        await store.add(good, max_queued=10)
        db = sqlite3.connect(path)
        db.execute("INSERT INTO jobs (id, status, queued_at, record) VALUES ('job_bad', 'queued', 0, 'not json')")
        db.commit()
        db.close()
        claimed = await store.claim("r", now=NOW + 5, lease=30)
        assert claimed is not None and claimed.id == good.id


async def test_a_stopped_redis_is_a_503_not_a_crash(nursery: trio.Nursery, tmp_path: Path) -> None:
    from proxy.errors import Overloaded

    server = RedisServer(nursery, tmp_path)
    with trio.fail_after(GUARD):
        await server.start()
        async with RedisJobStore(server.url, timeout=0.5) as store:
            await store.add(make_job(), max_queued=10)
            await server.kill()
            with pytest.raises(Overloaded) as caught:
                await store.add(make_job(1), max_queued=10)
            assert caught.value.status == 503 and caught.value.code == "job_store_unavailable"
    gc.collect()


def test_queue_full_is_a_503_with_retry_after() -> None:
    exc = QueueFull("full")
    assert (exc.status, exc.code, exc.retry_after) == (503, "job_queue_full", 5)
    job = replace(make_job(), status="completed")
    assert index_of(job).queued_at is None


async def test_a_purged_job_leaves_no_bytes_in_the_sqlite_files(tmp_path: Path) -> None:
    """A 404 is not enough: the prompt and the answer must be gone from the disk (issue 19)."""
    prompt = b'{"messages":[{"content":"the patient\'s diagnosis is confidential-7f3a"}]}' * 50
    answer = b"the model's answer: confidential-9c1e " * 200
    path = tmp_path / "jobs.sqlite3"

    def on_disk(needle: bytes) -> bool:
        return any(needle in p.read_bytes() for p in tmp_path.glob("jobs.sqlite3*"))

    async with SQLiteJobStore(path) as store:
        for n in range(3):  # later writes reuse pages: the purged job must not survive in a free one
            job = make_job(n, body=prompt if n == 0 else b"{}")
            await store.add(job, max_queued=10)
            running = await store.claim("r", now=NOW, lease=30)
            assert running is not None
            result = JobResult(200, (), answer if n == 0 else b"ok")
            assert await store.finish(jobs.completed(running, result, now=NOW, result_ttl=TTL * (n + 1)), "r")
        needles = (base64.b64encode(prompt)[:60], base64.b64encode(answer)[:60])  # stored as base64 in the record
        assert all(on_disk(n) for n in needles)
        assert await store.purge(now=NOW + TTL + 1) == 1
        assert not any(on_disk(n) for n in needles)
    assert not any(on_disk(n) for n in needles)


async def test_redis_job_hashes_expire_with_their_result_and_purge_cleans_the_indexes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = RedisServer(nursery, tmp_path)
    with trio.fail_after(GUARD):
        await server.start()
    raw = coredis.Redis.from_url(server.url)
    async with raw, RedisJobStore(server.url, key_prefix="t:") as store:
        quiet, hooked = make_job(0), make_job(1, callback="http://app/h")
        for job in (quiet, hooked):
            await store.add(job, max_queued=10)
            assert await raw.pttl(f"t:job:{job.id}") == -1  # queued: kept whatever happens
            running = await store.claim("r", now=NOW, lease=30)
            assert running is not None
            assert await store.finish(jobs.completed(running, JobResult(200), now=NOW, result_ttl=TTL), "r")
        assert (await raw.pexpiretime(f"t:job:{quiet.id}")).timestamp() == NOW + TTL
        assert await raw.pttl(f"t:job:{hooked.id}") == -1  # its delivery may still run
        due = await store.claim_delivery(now=NOW, lease=45)
        assert due is not None
        await store.delivered(jobs.after_attempt(due, AttemptOutcome(200), now=NOW, schedule=RetrySchedule()))
        assert (await raw.pexpiretime(f"t:job:{hooked.id}")).timestamp() == NOW + TTL
        await raw.delete([f"t:job:{quiet.id}"])  # as its TTL would: the index still names it
        assert await store.purge(now=NOW + TTL + 1) == 2
        assert await raw.keys("t:*") == {b"t:jobs:credentials"}  # no hash, and no index left holding an id
    await server.kill()


async def test_a_sqlite_file_from_before_the_credential_column_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    old = make_job(0, credential="legacy")
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, queued_at REAL, lease_until REAL,"
        " delivery_at REAL, expires_at REAL, record BLOB NOT NULL);"
    )
    db.execute("INSERT INTO jobs VALUES (?, 'queued', ?, NULL, NULL, NULL, ?)", (old.id, NOW, job_to_json(old)))
    db.commit()
    db.close()
    async with SQLiteJobStore(path) as store:
        with pytest.raises(QueueFull):  # the old job counts against its credential
            await store.add(make_job(1, credential="legacy"), max_queued=10, max_queued_credential=1)
        assert await store.claim("r", now=NOW, lease=30, skip_credentials={"legacy"}) is None
        claimed = await store.claim("r", now=NOW, lease=30)
        assert claimed is not None and claimed.id == old.id
