"""The job runner (proxy.jobs.runner) on a real SQLite file, a real upstream and a real receiver.

Deliveries are verified with the real ``standardwebhooks`` package. Waiting is on the runner's
``changed`` event (set after each run and each delivery attempt), never on a sleep.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from standardwebhooks.webhooks import Webhook

from proxy.config import Config, Credential, StateConfig
from proxy.jobs import model as jobs
from proxy.jobs import webhooks
from proxy.jobs.calls import run_headers
from proxy.jobs.model import JobRequest, JobsConfig
from proxy.jobs.runner import JobRunner
from proxy.jobs.sqlite import SQLiteJobStore
from proxy.limits.limiter import CREDENTIAL, LimitKey, LimitSpec
from proxy.limits.state import MemoryState, open_state
from proxy.upstream.outbound import outbound_client
from support.parkway import TEST_SERVER
from support.redis import RedisServer
from support.signing import INJECTED, SECRET, UPSTREAM_KEY
from support.upstream import Exchange, Upstream, hang, respond_with

HANG_LIMIT = 15.0
WHSEC = webhooks.format_secret(bytes(range(32)))
NEXT_WHSEC = webhooks.format_secret(bytes(range(40, 72)))


class Harness:
    def __init__(self, tmp_path: Path, upstream: Upstream, receiver: Upstream):
        self.upstream, self.receiver = upstream, receiver
        self.config = Config(
            server=TEST_SERVER,
            credentials=(
                Credential("app", (SECRET,), INJECTED, allowed_callbacks=(f"{receiver.base}/hooks/",),
                           webhook_secrets=(WHSEC, NEXT_WHSEC)),
            ),
            jobs=JobsConfig(enabled=True, path=str(tmp_path / "jobs.sqlite3"), retry_schedule=(0.05, 0.05, 0.05),
                            poll_interval=0.05, lease=1.0, result_ttl=60, max_jobs_in_flight=4,
                            purge_interval=0.1),
        )  # fmt: skip
        self.store = SQLiteJobStore(self.config.jobs.path)
        self.client = outbound_client()
        self.runner = JobRunner(self.store, self.client, lambda: self.config)

    def job(self, *, callback: bool = True, path: str = "/v1/chat/completions", body: bytes = b'{"q":1}') -> jobs.Job:
        return jobs.new_job(
            credential="app",
            request=JobRequest("POST", f"{self.upstream.base}{path}", (("content-type", "application/json"),), body),
            status_url_prefix="http://parkway.test/jobs",
            callback=f"{self.receiver.base}/hooks/parkway" if callback else None,
            user=None,
            now=time.time(),
        )

    async def add(self, job: jobs.Job) -> jobs.Job:
        await self.store.add(job, max_queued=100)
        self.runner.notify()
        return job

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self.runner.changed.wait()

    async def settled(self, job_id: str) -> jobs.Job:
        """The job once its delivery is over (delivered, stopped or given up)."""
        while (job := await self.stored(job_id)).delivery.state in ("none", "pending"):
            await self.runner.changed.wait()
        return job

    async def stored(self, job_id: str) -> jobs.Job:
        job = await self.store.get(job_id, now=time.time())
        assert job is not None
        return job


@pytest.fixture
async def harness(nursery: trio.Nursery, tmp_path: Path, upstream: Upstream) -> AsyncIterator[Harness]:
    receiver = await nursery.start(Upstream(respond_with(204, b"")).serve)
    h = Harness(tmp_path, upstream, receiver)
    done = trio.Event()
    async with h.store:
        await nursery.start(_start, h.runner, done)
        yield h
        h.runner.drain(0)
        with trio.fail_after(5):
            await done.wait()
    await h.client.aclose()


def verified(request) -> dict:
    """The delivery as a receiver verifies it with the standardwebhooks package (either secret)."""
    headers = {k: v for k, v in request.headers.items()}
    for secret in (WHSEC, NEXT_WHSEC):
        payload = Webhook(secret).verify(request.body, headers)
    return payload


async def test_a_job_runs_and_is_delivered_signed(harness: Harness) -> None:
    job = await harness.add(harness.job())
    (call,) = await harness.upstream.wait_for_requests(1)
    assert call.headers["authorization"] == f"Bearer {UPSTREAM_KEY}" and call.body == b'{"q":1}'
    (delivery,) = await harness.receiver.wait_for_requests(1)
    assert delivery.path == "/hooks/parkway" and delivery.headers["content-type"] == "application/json"
    assert delivery.headers["webhook-id"] == job.webhook_id
    assert len(delivery.headers["webhook-signature"].split(" ")) == 2  # one per secret: rotation
    payload = verified(delivery)
    assert payload["type"] == "job.completed" and payload["data"]["id"] == job.id
    answer = payload["data"]["response"]
    assert answer["status"] == 200 and json.loads(answer["body"])["target"] == "/v1/chat/completions"
    stored = await harness.stored(job.id)
    assert stored.status == "completed" and stored.result is not None and stored.attempts == 1


async def test_expired_jobs_are_purged_on_a_schedule(harness: Harness) -> None:
    """After ``result_ttl`` the row goes from the file, not only from GET's answers."""
    harness.config = replace(harness.config, jobs=replace(harness.config.jobs, result_ttl=0.3))
    job = await harness.add(harness.job(callback=False))

    def rows() -> int:
        with contextlib.closing(sqlite3.connect(harness.config.jobs.path)) as db:
            return int(db.execute("SELECT count(*) FROM jobs WHERE id = ?", (job.id,)).fetchone()[0])

    assert rows() == 1
    with trio.fail_after(10):
        await harness.until(lambda: rows() == 0)  # no read, no restart: the runner's schedule did it


async def test_receiver_down_then_up_gets_it_with_the_same_webhook_id(harness: Harness) -> None:
    answers = iter([None, 500, 204])

    async def flaky(ex: Exchange) -> None:
        status = next(answers)
        if status is None:
            await ex.close()  # down: the connection drops
        else:
            await ex.respond(status, [], b"")

    harness.receiver.behaviour = flaky
    job = await harness.add(harness.job())
    deliveries = await harness.receiver.wait_for_requests(3)
    assert {d.headers["webhook-id"] for d in deliveries} == {job.webhook_id}
    assert len({d.body for d in deliveries}) == 1  # the same payload bytes every time
    for d in deliveries:
        verified(d)
    stored = await harness.settled(job.id)
    assert stored.delivery.state == "delivered" and stored.delivery.attempts == 3


async def test_410_stops_delivery(harness: Harness) -> None:
    harness.receiver.behaviour = respond_with(410, b"gone")
    job = await harness.add(harness.job())
    await harness.receiver.wait_for_requests(1)
    stored = await harness.settled(job.id)
    assert stored.delivery.state == "stopped" and stored.delivery.attempts == 1
    # a schedule's worth of time later, still one attempt
    with trio.move_on_after(0.3):
        await harness.receiver.wait_for_requests(2)
    assert len(harness.receiver.requests) == 1


async def test_429_retry_after_is_honoured(harness: Harness) -> None:
    answers = iter([(429, [("retry-after", "1")]), (204, [])])

    async def busy(ex: Exchange) -> None:
        status, headers = next(answers)
        await ex.respond(status, headers, b"")

    harness.receiver.behaviour = busy
    job = await harness.add(harness.job())
    await harness.receiver.wait_for_requests(1)
    first = trio.current_time()
    await harness.receiver.wait_for_requests(2)
    assert trio.current_time() - first >= 0.9  # not the 0.05 s of the schedule
    assert {r.headers["webhook-id"] for r in harness.receiver.requests} == {job.webhook_id}


async def test_upstream_failure_fails_the_job_and_is_delivered(harness: Harness) -> None:
    harness.config = replace(harness.config, server=replace(TEST_SERVER, upstream_first_byte_timeout=0.2))
    harness.upstream.behaviour = hang
    job = await harness.add(harness.job())
    (delivery,) = await harness.receiver.wait_for_requests(1)
    payload = verified(delivery)
    assert payload["type"] == "job.failed"
    assert payload["data"]["error"]["code"] == "upstream_timeout" and "response" not in payload["data"]
    assert (await harness.stored(job.id)).status == "failed"


async def test_private_callback_is_refused_at_delivery(harness: Harness) -> None:
    """The SSRF guard applies to callbacks: a name resolving to loopback is refused without
    allow_private_upstreams (an IP literal listed in allowed_callbacks would allow itself)."""
    cred = harness.config.credentials[0]
    callbacks = (f"http://localhost:{harness.receiver.port}/hooks/",)
    harness.config = replace(
        harness.config,
        server=replace(TEST_SERVER, allow_private_upstreams=False),
        # the upstream is listed by address, so the call itself may go; the callback may not
        credentials=(replace(cred, allowed_upstreams=(f"{harness.upstream.base}/",), allowed_callbacks=callbacks),),
    )
    job = await harness.add(replace(harness.job(), callback=f"{callbacks[0]}parkway"))
    await harness.upstream.wait_for_requests(1)
    stored = await harness.settled(job.id)
    assert stored.delivery.state == "failed" and "loopback" in (stored.delivery.last_error or "")
    assert stored.delivery.attempts == 1  # refused for good, not retried
    assert harness.receiver.requests == [] and harness.receiver.connections == 0


async def test_no_callback_means_no_delivery(harness: Harness) -> None:
    job = await harness.add(harness.job(callback=False))
    await harness.upstream.wait_for_requests(1)
    while (await harness.stored(job.id)).status != "completed":
        await harness.runner.changed.wait()
    assert (await harness.stored(job.id)).delivery.state == "none" and harness.receiver.requests == []


async def test_cancel_stops_the_upstream_call(harness: Harness) -> None:
    harness.upstream.behaviour = hang
    job = await harness.add(harness.job())
    await harness.upstream.wait_for_requests(1)
    cancelled = await harness.store.cancel(job.id, now=time.time(), result_ttl=60)
    assert cancelled is not None and cancelled.job.status == "cancelled" and cancelled.was == "in_progress"
    harness.runner.cancel_local(job.id)
    with trio.fail_after(5):
        await harness.upstream.disconnected.wait()
    (delivery,) = await harness.receiver.wait_for_requests(1)
    assert verified(delivery)["type"] == "job.cancelled"
    assert (await harness.stored(job.id)).status == "cancelled"


async def test_a_job_whose_runner_died_is_taken_over_after_the_lease(
    nursery: trio.Nursery, tmp_path: Path, upstream: Upstream
) -> None:
    receiver = await nursery.start(Upstream(respond_with(204, b"")).serve)
    h = Harness(tmp_path, upstream, receiver)
    done = trio.Event()
    async with h.store:
        job = h.job()
        await h.store.add(job, max_queued=10)
        dead = await h.store.claim("dead-process", now=time.time(), lease=0.5)
        assert dead is not None and dead.id == job.id
        await nursery.start(_start, h.runner, done)
        await upstream.wait_for_requests(1)  # the lease ran out: this runner took it over
        stored = await h.settled(job.id)
        assert stored.status == "completed" and stored.attempts == 2 and stored.delivery.state == "delivered"
        h.runner.drain(0)
        with trio.fail_after(5):
            await done.wait()
    await h.client.aclose()


async def test_a_job_interrupted_too_often_is_abandoned(harness: Harness) -> None:
    job = replace(harness.job(), attempts=harness.config.jobs.max_attempts)
    await harness.add(job)
    (delivery,) = await harness.receiver.wait_for_requests(1)
    assert verified(delivery)["data"]["error"]["code"] == "job_abandoned"
    assert harness.upstream.requests == []


async def test_drain_puts_running_jobs_back_in_the_queue(
    nursery: trio.Nursery, tmp_path: Path, upstream: Upstream
) -> None:
    receiver = await nursery.start(Upstream(respond_with(204, b"")).serve)
    h = Harness(tmp_path, upstream, receiver)
    upstream.behaviour = hang
    async with h.store:
        done = trio.Event()
        await nursery.start(_start, h.runner, done)
        job = await h.add(h.job())
        await upstream.wait_for_requests(1)
        h.runner.drain(0.2)
        with trio.fail_after(5):
            await done.wait()
        stored = await h.store.get(job.id, now=time.time())
        assert stored is not None and stored.status == "queued" and stored.owner is None
        assert upstream.disconnected.is_set()
    await h.client.aclose()


async def _start(runner: JobRunner, done: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run ``runner`` until it has drained, then set ``done``."""
    try:
        await runner.run(task_status=task_status)
    finally:
        done.set()


@pytest.mark.parametrize(("sent", "expected"), [((), None), ((("Accept-Encoding", "br"),), "br")])
async def test_the_upstream_call_asks_for_the_clients_encoding_or_none(
    harness: Harness, sent: tuple[tuple[str, str], ...], expected: str | None
) -> None:
    """httpx's default ``gzip, deflate`` would store gzip bytes the client never asked for."""
    job = harness.job(callback=False)
    await harness.add(replace(job, request=replace(job.request, headers=job.request.headers + sent)))
    (call,) = await harness.upstream.wait_for_requests(1)
    assert call.headers.get("accept-encoding") == expected
    assert "user-agent" not in call.headers and "accept" not in call.headers  # nothing the client did not send


def test_run_headers_inject_the_credentials_and_override_the_clients() -> None:
    job = replace(
        jobs.new_job(credential="app", request=JobRequest("POST", "http://u/", (("Authorization", "Bearer client"),
                     ("accept", "*/*")), b"abc"), status_url_prefix="http://p/jobs", callback=None, user=None, now=0),
    )  # fmt: skip
    cred = Credential("app", ("s",), (("Authorization", "Bearer injected"),))
    assert run_headers(job, cred) == [
        (b"accept", b"*/*"), (b"authorization", b"Bearer injected"), (b"content-length", b"3"),
    ]  # fmt: skip


async def test_a_redis_outage_is_logged_once_and_jobs_run_after_it(
    nursery: trio.Nursery, tmp_path: Path, upstream: Upstream
) -> None:
    from proxy.jobs.redis import RedisJobStore
    from support.logs import watch_logs
    from support.redis import RedisServer

    redis = RedisServer(nursery, tmp_path)
    await redis.start()
    receiver = await nursery.start(Upstream(respond_with(204, b"")).serve)
    h = Harness(tmp_path, upstream, receiver)
    h.store = RedisJobStore(redis.url, timeout=0.5)  # type: ignore[assignment]
    h.runner = JobRunner(h.store, h.client, lambda: h.config)
    done = trio.Event()
    with watch_logs() as logs:
        async with h.store:
            await nursery.start(_start, h.runner, done)
            await redis.kill()
            await logs.wait_for(event="job_store_unavailable")
            await redis.start()  # polls failed meanwhile (every 0.05 s), quietly; it is back, empty

            await logs.wait_for(event="job_store_recovered")
            job = await h.add(h.job())
            await receiver.wait_for_requests(1)
            assert (await h.stored(job.id)).status == "completed"
            h.runner.drain(0)
            with trio.fail_after(5):
                await done.wait()
    assert len(logs.find(event="job_store_unavailable")) == 1
    await h.client.aclose()
    await redis.kill()


async def test_a_credential_runs_its_share_and_max_concurrent_applies_to_job_runs(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Issue 19: one credential's jobs must not take every runner slot, and a credential's or
    user's ``max_concurrent`` counts job runs as it counts proxied streams."""
    gate = trio.Event()

    async def gated(ex: Exchange) -> None:
        await gate.wait()
        await ex.respond(200, [("content-type", "text/plain")], b"ok")

    upstream = await nursery.start(Upstream(gated).serve)
    config = Config(
        server=TEST_SERVER,
        credentials=(
            Credential("busy", (SECRET,), INJECTED, max_jobs_running=2),
            Credential("other", (SECRET,), INJECTED),
            Credential("users", (SECRET,), INJECTED, user_limits=LimitSpec(max_concurrent=1)),
            Credential("capped", (SECRET,), INJECTED, limits=LimitSpec(max_concurrent=1)),
        ),
        jobs=JobsConfig(enabled=True, path=str(tmp_path / "jobs.sqlite3"), poll_interval=0.05, max_jobs_in_flight=8),
    )
    store, client, state = SQLiteJobStore(config.jobs.path), outbound_client(), MemoryState()
    runner = JobRunner(store, client, lambda: config, state=state)

    def job(credential: str, name: str, user: str | None = None) -> jobs.Job:
        request = JobRequest("GET", f"{upstream.base}/{name}")
        return jobs.new_job(credential=credential, request=request, status_url_prefix="http://p/jobs",
                            callback=None, user=user, now=time.time())  # fmt: skip

    async def all_completed() -> bool:
        for one in added:
            stored = await store.get(one.id, now=time.time())
            if stored is None or stored.status != "completed":
                return False
        return True

    done = trio.Event()
    async with store:
        added = [job("busy", f"busy{i}") for i in range(4)] + [job("other", "other0")]
        added += [job("users", "alice0", "alice"), job("users", "alice1", "alice"), job("users", "bob0", "bob")]
        added += [job("capped", "capped0"), job("capped", "capped1")]
        for one in added:
            await store.add(one, max_queued=100)
        await nursery.start(_start, runner, done)
        with trio.fail_after(10):
            calls = await upstream.wait_for_requests(6)
            # alice's second job (her user_limits) and capped's second (its limits) were given back, not run
            while not (runner.deferrals["user"] and runner.deferrals["credential"]):
                await runner.changed.wait()
        paths = sorted(c.path for c in calls)
        assert paths == ["/alice0", "/bob0", "/busy0", "/busy1", "/capped0", "/other0"], paths
        assert runner.running_by_credential == {"busy": 2, "other": 1, "users": 2, "capped": 1}
        for waiting_id in (added[6].id, added[9].id):
            waiting = await store.get(waiting_id, now=time.time())
            assert waiting is not None and waiting.status == "queued" and waiting.attempts == 0
        gate.set()
        with trio.fail_after(10):
            await upstream.wait_for_requests(10)
            while not await all_completed():
                await runner.changed.wait()
        runner.drain(0)
        with trio.fail_after(5):
            await done.wait()
    await client.aclose()


async def test_a_job_claimed_while_a_stalled_redis_holds_its_slot_goes_back_on_a_drain(
    nursery: trio.Nursery, tmp_path: Path, redis: RedisServer
) -> None:
    """A claimed job waiting for its ``max_concurrent`` slot when the drain deadline comes is given
    back to the queue at once, its claim not counted, not left leased until another runner takes
    it ``lease`` seconds later. Redis is stopped (SIGSTOP), not down: the slot's script waits."""
    config = Config(
        server=TEST_SERVER,
        credentials=(Credential("capped", (SECRET,), INJECTED, limits=LimitSpec(max_concurrent=1)),),
        jobs=JobsConfig(enabled=True, path=str(tmp_path / "jobs.sqlite3"), poll_interval=0.05),
    )
    store, client = SQLiteJobStore(config.jobs.path), outbound_client()
    request = JobRequest("GET", "http://127.0.0.1:9/never")  # never called: the run never begins
    job = jobs.new_job(credential="capped", request=request, status_url_prefix="http://p/jobs",
                       callback=None, user=None, now=time.time())  # fmt: skip
    state_config = StateConfig(backend="redis", url=redis.url, key_prefix="parkway-jobs:", timeout=30)
    async with store, open_state(state_config) as state:
        await store.add(job, max_queued=10)
        runner = JobRunner(store, client, lambda: config, state=state)
        done = trio.Event()
        # Connected first: a stopped Redis still takes a TCP connection, then never answers.
        warm = await state.acquire([LimitKey(CREDENTIAL, "warm-up", LimitSpec(max_concurrent=1))], trio.current_time())
        await state.release(warm.lease)
        redis.process.send_signal(signal.SIGSTOP)
        try:
            await nursery.start(_start, runner, done)
            with trio.fail_after(10):  # claimed, then waiting on Redis (the store has no signal of its own)
                while (claimed := await store.get(job.id, now=time.time())) is None or claimed.status != "in_progress":
                    await trio.sleep(0.02)
            runner.drain(0)
            with trio.fail_after(5):
                await done.wait()
        finally:
            redis.process.send_signal(signal.SIGCONT)
        given_back = await store.get(job.id, now=time.time())
        assert given_back is not None and (given_back.status, given_back.attempts) == ("queued", 0)
    await client.aclose()
