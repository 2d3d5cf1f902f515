"""Token and spend budgets end to end (docs/budgets.md): real sockets, the mock OpenAI upstream
(which stops at max_tokens and reports usage), Parkway in process or as ``parkway serve``
processes on one real redis-server.

The upstream's own count is the referee: whatever Parkway decides, the usage the upstream
reported for the requests it served never adds up to more than the budget.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import coredis
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from proxy.cache.policy import CacheRules
from proxy.config import Config, StateConfig
from proxy.demo.mock_openai import MockOpenAI, serve_mock
from proxy.errors import Overloaded
from proxy.jobs.model import JobsConfig
from proxy.limits.budget import Level, Settlement, applied_budgets, budget_key, request_cost
from proxy.limits.budget_redis import RedisBudgets
from proxy.limits.budget_spec import NANO_USD, USD, BudgetsConfig, BudgetSpec, Price, PriceTable
from proxy.limits.budget_state import budget_report
from support.http import Call, Reply, call
from support.logs import LogWatcher, watch_logs
from support.metrics import Scrape, parse_metrics
from support.parkway import TEST_CREDENTIAL, RunningParkway, make_config, redis_parkway_toml, run_parkway, with_jobs
from support.processes import ProcessGroup, free_port
from support.redis import RedisServer
from support.signing import sign
from support.upstream import Upstream, hang
from support.websocket import RealtimeUpstream, event, ws_client

pytestmark = pytest.mark.usefixtures("hang_guard")
HANG_LIMIT = 40.0

CHAT = "/v1/chat/completions"
WORDS = " ".join(f"w{i}" for i in range(400))  # answers as long as max_tokens allows
CREATED = 1_733_529_600


def chat(max_tokens: int | None = 200, *, model: str = "mock-gpt", **more: object) -> bytes:
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": "hi"}], **more}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps(body, separators=(",", ":")).encode()


def signed(base: str, upstream: str, user: str | None = "alice", *, path: str = CHAT) -> str:
    params = {"pw_user": user} if user else None
    return sign(base, upstream + path, method="POST", signer="proxy.signing", params=params)


async def post(port: int, url: str, body: bytes, timeout: float = 10.0) -> Reply:
    return await call(port, "POST", url, body=body, headers=[("content-type", "application/json")], timeout=timeout)


@pytest.fixture
async def mock(nursery: trio.Nursery) -> tuple[MockOpenAI, str]:
    app = MockOpenAI(text=WORDS, delay=0.0, created=CREATED)
    return app, await nursery.start(serve_mock, app)


def served_usage(app: MockOpenAI) -> int:
    """Tokens the upstream charged for what it served: its own count (prompt 9 + one per word)."""
    total = 0
    for _head, body in app.requests:
        request = json.loads(body)
        cap = request.get("max_completion_tokens", request.get("max_tokens"))
        total += 9 + min(cap, 400)
    return total


# --- one budget, forty requests at once ------------------------------------------------------------


async def test_forty_concurrent_requests_never_overspend_a_user_budget(start_parkway, mock):
    app, upstream = mock
    budget = BudgetSpec(1000, "tokens", "day")
    parkway = await start_parkway(credentials=(replace(TEST_CREDENTIAL, user_budget=budget),))
    body = chat(200)  # holds len(body) + 200 = ~275 tokens: three fit in 1,000, a fourth does not
    replies: list[Reply] = []

    async def one() -> None:
        replies.append(await post(parkway.port, signed(parkway.base, upstream), body))

    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(one)

    served = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status != 200]
    assert len(served) >= 3
    assert len(served) + len(refused) == 40
    assert all(r.status == 429 and r.code == "budget_exhausted" for r in refused), {r.status for r in refused}
    assert len(app.requests) == len(served)  # a refused request never reached the upstream
    reported = sum(r.json()["usage"]["total_tokens"] for r in served)
    assert reported == served_usage(app) <= 1000
    refusal = refused[0]
    assert "'user-day'" in refusal.message and 0 < int(refusal.headers["retry-after"]) <= 86400
    assert refusal.headers["ratelimit-policy"] == '"user-day";q=1000;w=86400'
    assert refusal.headers["ratelimit"].startswith('"user-day";r=')
    # Answers tell the client its budget; browsers may read it.
    assert served[0].headers["ratelimit-policy"] == '"user-day";q=1000;w=86400'
    assert "RateLimit" in " ".join(v.decode() for v in served[0].values("access-control-expose-headers"))

    # Another user of the same credential has a budget of their own.
    other = await post(parkway.port, signed(parkway.base, upstream, "bob"), body)
    assert other.status == 200
    assert len(app.requests) == len(served) + 1
    metrics = Scrape(parse_metrics(parkway.parkway.metrics.render().decode()))
    assert metrics.value("parkway_budget_refusals_total", budget="user-day") == len(refused)
    charged = metrics.value("parkway_budget_tokens_charged_total", credential="app")
    assert charged == reported + other.json()["usage"]["total_tokens"]


async def test_a_user_budget_needs_a_signed_user_and_an_output_cap_is_written(start_parkway, mock):
    app, upstream = mock
    parkway = await start_parkway(
        credentials=(replace(TEST_CREDENTIAL, user_budget=BudgetSpec(10_000, "tokens", "day"), max_tokens=50),)
    )
    anonymous = await post(parkway.port, signed(parkway.base, upstream, None), chat(10))
    assert (anonymous.status, anonymous.code) == (400, "user_required")
    assert app.requests == []

    # No max_tokens in the body: the credential's cap is written in, so the hold is bounded.
    with watch_logs() as logs:
        reply = await post(parkway.port, signed(parkway.base, upstream), chat(None))
        line = await logs.wait_for(event="request", request_id=reply.headers["x-request-id"])
    assert reply.status == 200
    forwarded = json.loads(app.requests[0][1])
    assert forwarded["max_completion_tokens"] == 50
    assert reply.json()["usage"]["completion_tokens"] == 50
    assert line["budget_estimate"] == "usage" and line["budget_charge"] == 59
    assert line["budget_hold"] == len(chat(None)) + 50  # the client's body bounds the prompt


# --- streams ----------------------------------------------------------------------------------------


async def test_a_stream_is_charged_from_the_usage_parkway_asked_for_and_the_client_never_sees_it(
    start_parkway, mock, relay_path
):
    app, upstream = mock
    parkway = await start_parkway(credentials=(replace(TEST_CREDENTIAL, budget=BudgetSpec(10_000, "tokens", "day")),))
    body = chat(30, stream=True)
    with watch_logs() as logs:
        reply = await post(parkway.port, signed(parkway.base, upstream), body)
        line = await logs.wait_for(event="request", request_id=reply.headers["x-request-id"])
    assert reply.status == 200 and reply.complete
    forwarded = json.loads(app.requests[0][1])
    assert forwarded["stream_options"] == {"include_usage": True}
    # Byte for byte the answer the upstream gives a client that did not ask for usage.
    direct = await post(int(upstream.rpartition(":")[2]), upstream + CHAT, body)
    assert b'"usage"' not in direct.body
    assert reply.body == direct.body
    assert line["budget_estimate"] == "usage" and line["budget_charge"] == 9 + 30

    # A client that asked for usage itself gets its chunk, untouched.
    asked = chat(30, stream=True, stream_options={"include_usage": True})
    own = await post(parkway.port, signed(parkway.base, upstream), asked)
    direct = await post(int(upstream.rpartition(":")[2]), upstream + CHAT, asked)
    assert b'"usage"' in own.body and own.body == direct.body


async def test_a_client_that_leaves_mid_stream_is_charged_its_hold(start_parkway, nursery):
    app = MockOpenAI(text=WORDS, delay=0.05, created=CREATED)
    upstream = await nursery.start(serve_mock, app)
    budget = BudgetSpec(10_000, "tokens", "day")
    parkway = await start_parkway(credentials=(replace(TEST_CREDENTIAL, user_budget=budget),))
    body = chat(300, stream=True)
    with watch_logs() as logs:
        stream = await Call.open(parkway.port, "POST", signed(parkway.base, upstream), body=body)
        with trio.fail_after(5):
            await stream.read_until(b'"content":"w0"')
        await stream.aclose()
        line = await logs.wait_for(event="request", outcome="client_gone")
    hold = len(body) + 300
    assert line["budget_hold"] == hold
    assert line["budget_estimate"] == "hold:client_gone" and line["budget_charge"] == hold
    key = budget_key("user", "app", "alice", budget, parkway.parkway.gateway.clock())
    [level] = await parkway.parkway.gateway.budgets.levels([key])
    assert (level.spent, level.held) == (hold, 0)


async def test_a_cache_hit_costs_nothing_and_says_so(start_parkway, mock):
    app, upstream = mock
    budget = BudgetSpec(10_000, "tokens", "day")
    parkway = await start_parkway(credentials=(replace(TEST_CREDENTIAL, user_budget=budget, cache=CacheRules(ttl=60)),))
    url = signed(parkway.base, upstream)
    with watch_logs() as logs:
        first = await post(parkway.port, url, chat(20))
        miss = await logs.wait_for(event="request", request_id=first.headers["x-request-id"])
        second = await post(parkway.port, url, chat(20))
        hit = await logs.wait_for(event="request", request_id=second.headers["x-request-id"])
    assert (first.status, second.status, len(app.requests)) == (200, 200, 1)
    assert miss["budget_estimate"] == "usage" and miss["budget_charge"] == 29
    assert (hit["cache"], hit["budget_estimate"], hit["budget_charge"]) == ("hit", "free:cache", 0)
    key = budget_key("user", "app", "alice", budget, parkway.parkway.gateway.clock())
    [level] = await parkway.parkway.gateway.budgets.levels([key])
    assert (level.spent, level.held) == (29, 0)


async def test_a_cached_stream_is_stored_and_replayed_without_the_usage_parkway_asked_for(start_parkway, mock):
    # The cache's own upstream call (the flight) records what the client would get: the usage chunk
    # Parkway asked for on the budget's behalf is charged from, never stored, never replayed.
    app, upstream = mock
    budget = BudgetSpec(10_000, "tokens", "day")
    parkway = await start_parkway(credentials=(replace(TEST_CREDENTIAL, user_budget=budget, cache=CacheRules(ttl=60)),))
    url = signed(parkway.base, upstream)
    body = chat(30, stream=True)
    with watch_logs() as logs:
        first = await post(parkway.port, url, body)
        miss = await logs.wait_for(event="request", request_id=first.headers["x-request-id"])
        second = await post(parkway.port, url, body)
        hit = await logs.wait_for(event="request", request_id=second.headers["x-request-id"])
    assert (first.status, second.status, len(app.requests)) == (200, 200, 1)
    assert json.loads(app.requests[0][1])["stream_options"] == {"include_usage": True}
    direct = await post(int(upstream.rpartition(":")[2]), upstream + CHAT, body)
    assert b'"usage"' not in direct.body
    assert first.body == direct.body and second.body == direct.body
    assert (miss["budget_estimate"], miss["budget_charge"]) == ("usage", 9 + 30)
    assert (hit["cache"], hit["budget_charge"]) == ("hit", 0)


def job_parkway_config(tmp_path: Path, budget: BudgetSpec, state: StateConfig | None = None) -> Config:
    config = with_jobs(
        make_config(credentials=(replace(TEST_CREDENTIAL, user_budget=budget),)),
        JobsConfig(enabled=True, path=str(tmp_path / "jobs.sqlite3"), poll_interval=0.05),
    )
    return config if state is None else replace(config, state=state)


async def run_job(parkway: RunningParkway, upstream: str, body: bytes) -> tuple[dict, dict, dict]:
    """Submit ``body`` as alice's background job; its request log line (the hold charged when
    accepted), the runner's settlement line, and the job's stored answer."""
    url = sign(
        parkway.base, upstream + CHAT, method="POST", signer="proxy.signing",
        params={"pw_user": "alice", "pw_async": "1"},
    )  # fmt: skip
    with watch_logs() as logs:
        queued = await call(
            parkway.port, "POST", url, body=body,
            headers=[("content-type", "application/json"), ("prefer", "respond-async")],
        )  # fmt: skip
        assert queued.status == 202, queued.body
        accepted = await logs.wait_for(event="request", request_id=queued.headers["x-request-id"])
        with trio.fail_after(20):  # the runner settles the job once its upstream call ended
            settled = await logs.wait_for(event="job_budget_settled")
    status = await call(parkway.port, "GET", urlsplit(queued.headers["location"]).path)
    return accepted, settled, status.json()


def alice_key(parkway: RunningParkway, budget: BudgetSpec) -> str:
    return budget_key("user", "app", "alice", budget, parkway.parkway.gateway.clock())


async def test_a_background_job_is_charged_the_usage_its_upstream_reported(nursery, mock, tmp_path):
    app, upstream = mock
    budget = BudgetSpec(1000, "tokens", "day")
    parkway = await run_parkway(nursery, job_parkway_config(tmp_path, budget))
    body = chat(200)
    accepted, settled, job = await run_job(parkway, upstream, body)
    usage = json.loads(job["response"]["body"])["usage"]["total_tokens"]
    assert usage == served_usage(app) == 9 + 200 < len(body) + 200
    # Held in full when accepted, then replaced by what the upstream reported.
    assert (accepted["budget_estimate"], accepted["budget_charge"]) == ("hold:job", len(body) + 200)
    assert (settled["budget_estimate"], settled["budget_charge"], settled["same_ledger"]) == ("usage", usage, True)
    [level] = await parkway.parkway.gateway.budgets.levels([alice_key(parkway, budget)])
    assert (level.spent, level.held) == (usage, 0)
    metrics = Scrape(parse_metrics(parkway.parkway.metrics.render().decode()))
    assert metrics.value("parkway_budget_tokens_charged_total", credential="app") == usage  # not the hold as well
    parkway.parkway.shutdown()


async def test_a_background_job_on_redis_is_settled_in_the_shared_budget(nursery, mock, redis, tmp_path):
    app, upstream = mock
    budget = BudgetSpec(1000, "tokens", "day")
    state = StateConfig(backend="redis", url=redis.url, key_prefix="parkway-e2e:", timeout=5)
    parkway = await run_parkway(nursery, job_parkway_config(tmp_path, budget, state))
    _accepted, settled, job = await run_job(parkway, upstream, chat(200))
    usage = json.loads(job["response"]["body"])["usage"]["total_tokens"]
    assert (settled["budget_estimate"], settled["budget_charge"]) == ("usage", usage)
    # What `parkway budget show` prints, from Redis.
    [shown] = await budget_report(parkway.config, "app", "alice", parkway.parkway.gateway.clock())
    assert shown.startswith(
        f"user-day: limit 1000 tokens, spent {usage} tokens, held 0 tokens, remaining {1000 - usage} tokens"
    ), shown
    parkway.parkway.shutdown()


async def test_a_background_job_without_usage_is_charged_its_hold(nursery, mock, tmp_path):
    _app, upstream = mock
    budget = BudgetSpec(1000, "tokens", "day")
    parkway = await run_parkway(nursery, job_parkway_config(tmp_path, budget))
    body = chat(200, stream=True)  # a stream that did not ask for usage: the upstream reports none
    _accepted, settled, job = await run_job(parkway, upstream, body)
    assert b'"usage"' not in job["response"]["body"].encode()
    hold = len(body) + 200
    assert (settled["budget_estimate"], settled["budget_charge"]) == ("hold:no_usage", hold)
    [level] = await parkway.parkway.gateway.budgets.levels([alice_key(parkway, budget)])
    assert (level.spent, level.held) == (hold, 0)
    parkway.parkway.shutdown()


async def test_a_background_job_whose_upstream_is_never_reached_is_charged_nothing(nursery, tmp_path):
    budget = BudgetSpec(1000, "tokens", "day")
    parkway = await run_parkway(nursery, job_parkway_config(tmp_path, budget))
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: the connection is refused
    _accepted, settled, job = await run_job(parkway, closed, chat(200))
    assert job["status"] == "failed"
    assert (settled["budget_estimate"], settled["budget_charge"]) == ("nothing:upstream_connect_failed", 0)
    [level] = await parkway.parkway.gateway.budgets.levels([alice_key(parkway, budget)])
    assert (level.spent, level.held) == (0, 0)
    parkway.parkway.shutdown()


# --- a job cancelled while queued gets its hold back -------------------------------------------------


async def submit_job(parkway: RunningParkway, upstream: str, body: bytes, logs: LogWatcher) -> tuple[str, int]:
    """Alice's background job: its status path, and the hold its request line says it was charged."""
    url = sign(
        parkway.base, upstream + CHAT, method="POST", signer="proxy.signing",
        params={"pw_user": "alice", "pw_async": "1"},
    )  # fmt: skip
    queued = await call(
        parkway.port, "POST", url, body=body,
        headers=[("content-type", "application/json"), ("prefer", "respond-async")],
    )  # fmt: skip
    assert queued.status == 202, queued.body
    accepted = await logs.wait_for(event="request", request_id=queued.headers["x-request-id"])
    assert accepted["budget_estimate"] == "hold:job"
    return urlsplit(queued.headers["location"]).path, accepted["budget_charge"]


async def spent(parkway: RunningParkway, budget: BudgetSpec) -> int:
    [level] = await parkway.parkway.gateway.budgets.levels([alice_key(parkway, budget)])
    assert level.held == 0  # a job's hold is charged as spent, never leased
    return level.spent


async def one_running_one_queued(
    parkway: RunningParkway, upstream: Upstream, budget: BudgetSpec, logs: LogWatcher
) -> tuple[str, str, int]:
    """Job A's upstream call hangs, so with max_jobs_in_flight = 1 job B stays queued; their
    status paths, and what the budget had spent before B was accepted."""
    upstream.behaviour = hang
    running, held = await submit_job(parkway, f"http://{upstream.netloc}", chat(100), logs)
    with trio.fail_after(20):
        await upstream.wait_for_requests(1)  # A is running: its upstream was called
    before = await spent(parkway, budget)
    assert before == held
    queued, hold = await submit_job(parkway, f"http://{upstream.netloc}", chat(200), logs)
    assert await spent(parkway, budget) == before + hold == before + len(chat(200)) + 200
    return running, queued, before


async def cancel_queued_and_running(parkway: RunningParkway, upstream: Upstream, budget: BudgetSpec) -> None:
    with watch_logs() as logs:
        running, queued, before = await one_running_one_queued(parkway, upstream, budget, logs)
        # the request line of a job request names the job, as the runner's lines do
        read = await call(parkway.port, "GET", queued)
        assert (read.status, read.json()["status"]) == (200, "queued")
        line = await logs.wait_for(event="request", request_id=read.headers["x-request-id"])
        assert line["job"] == queued.rpartition("/")[2][:12]
        deleted = await call(parkway.port, "DELETE", queued)
        assert (deleted.status, deleted.json()["status"]) == (200, "cancelled")
        [settled] = logs.find(event="job_budget_settled")
        assert (settled["budget_estimate"], settled["budget_charge"], settled["interrupted_runs"]) == (
            "nothing:cancelled", 0, 0,
        )  # fmt: skip
        assert settled["job"] == queued.rpartition("/")[2][:12]
        assert await spent(parkway, budget) == before  # back to what it was before B was accepted
        line = await logs.wait_for(event="request", request_id=deleted.headers["x-request-id"])
        assert line["job"] == settled["job"]
        # a second DELETE gives nothing back
        again = await call(parkway.port, "DELETE", queued)
        assert (again.status, again.json()["status"]) == (200, "cancelled")
        assert len(logs.find(event="job_budget_settled")) == 1
        assert await spent(parkway, budget) == before
        # the running job keeps its hold: its upstream was called, and may bill it
        stopped = await call(parkway.port, "DELETE", running)
        assert (stopped.status, stopped.json()["status"]) == (200, "cancelled")
        with trio.fail_after(20):
            await logs.wait_for(event="job_stopped", job=running.rpartition("/")[2][:12])
        assert len(logs.find(event="job_budget_settled")) == 1
        assert await spent(parkway, budget) == before
    metrics = Scrape(parse_metrics(parkway.parkway.metrics.render().decode()))
    assert metrics.value("parkway_budget_tokens_charged_total", credential="app") in (0, None)
    parkway.parkway.shutdown()


def queueing_one_job(
    tmp_path: Path, budget: BudgetSpec, state: StateConfig | None = None, store: str = "sqlite"
) -> Config:
    """One job runs at a time: the next one waits in the queue while it runs."""
    config = job_parkway_config(tmp_path, budget, state)
    return replace(config, jobs=replace(config.jobs, max_jobs_in_flight=1, store=store))


async def test_a_job_cancelled_while_queued_gets_its_hold_back_and_a_running_one_keeps_it(
    nursery, upstream, tmp_path
):  # fmt: skip
    """SQLite jobs, memory budgets."""
    budget = BudgetSpec(5000, "tokens", "day")
    parkway = await run_parkway(nursery, queueing_one_job(tmp_path, budget))
    await cancel_queued_and_running(parkway, upstream, budget)


async def test_a_job_cancelled_while_queued_on_redis_gets_its_hold_back(nursery, upstream, redis, tmp_path):
    """Redis jobs and budgets, shared by every process."""
    budget = BudgetSpec(5000, "tokens", "day")
    state = StateConfig(backend="redis", url=redis.url, key_prefix="parkway-e2e:", timeout=5)
    parkway = await run_parkway(nursery, queueing_one_job(tmp_path, budget, state, store="redis"))
    await cancel_queued_and_running(parkway, upstream, budget)


async def test_a_refund_the_budget_store_cannot_record_is_logged_and_the_hold_stays(
    nursery, upstream, redis, tmp_path
):  # fmt: skip
    budget = BudgetSpec(5000, "tokens", "day")
    state = StateConfig(backend="redis", url=redis.url, key_prefix="parkway-e2e:", timeout=0.5)
    parkway = await run_parkway(nursery, queueing_one_job(tmp_path, budget, state))  # jobs in SQLite
    with watch_logs() as logs:
        _running, queued, before = await one_running_one_queued(parkway, upstream, budget, logs)
        hold = len(chat(200)) + 200
        async with coredis.Redis.from_url(redis.url) as client:
            await client.save()  # on disk, so that the restarted server still has the budget
        await redis.kill()  # refused at once: the refund is surely not written
        deleted = await call(parkway.port, "DELETE", queued)
        assert (deleted.status, deleted.json()["status"]) == (200, "cancelled")
        [lost] = logs.find(event="budget_charge_lost")
        assert (lost["budget_estimate"], lost["job"]) == ("nothing:cancelled", queued.rpartition("/")[2][:12])
        assert not logs.find(event="job_budget_settled")
    await redis.start()
    async with RedisBudgets(redis.url, key_prefix="parkway-e2e:", timeout=5) as budgets:
        [level] = await budgets.levels([alice_key(parkway, budget)])
    assert level.spent == before + hold  # the hold stays charged: never overspent
    parkway.parkway.shutdown()


async def levels_become(redis: RedisServer, key: str, wanted: Level) -> None:
    """Poll the real Redis (a client of its own, patient) until ``key``'s levels are ``wanted``:
    the only signal that a script sent to a stalled Redis ran once it resumed. Bounded."""
    async with RedisBudgets(redis.url, key_prefix="parkway-e2e:", timeout=5) as budgets:
        with trio.move_on_after(10):
            while (await budgets.levels([key]))[0] != wanted:
                await trio.sleep(0.05)
        assert (await budgets.levels([key]))[0] == wanted


async def test_a_refund_a_stalled_redis_did_not_answer_is_logged_unknown_and_applied_when_it_resumes(
    nursery, upstream, redis, tmp_path
):  # fmt: skip
    budget = BudgetSpec(5000, "tokens", "day")
    state = StateConfig(backend="redis", url=redis.url, key_prefix="parkway-e2e:", timeout=1)
    parkway = await run_parkway(nursery, queueing_one_job(tmp_path, budget, state))  # jobs in SQLite
    with watch_logs() as logs:
        _running, queued, before = await one_running_one_queued(parkway, upstream, budget, logs)
        redis.process.send_signal(signal.SIGSTOP)  # hung, not down: the refund is sent, not answered
        try:
            deleted = await call(parkway.port, "DELETE", queued, timeout=20)
            assert (deleted.status, deleted.json()["status"]) == (200, "cancelled")
            [unknown] = logs.find(event="budget_charge_unknown")
            assert (unknown["budget_estimate"], unknown["job"]) == ("nothing:cancelled", queued.rpartition("/")[2][:12])
            assert "may be recorded when Redis answers" in unknown["reason"]
            assert not logs.find(event="budget_charge_lost") and not logs.find(event="job_budget_settled")
        finally:
            redis.process.send_signal(signal.SIGCONT)
    await levels_become(redis, alice_key(parkway, budget), Level(before, 0))  # the refund ran after all
    parkway.parkway.shutdown()


async def test_a_charge_a_stalled_redis_did_not_answer_is_logged_unknown_and_applied_when_it_resumes(
    nursery, redis
):  # fmt: skip
    app = MockOpenAI(text=WORDS, delay=0.01, created=CREATED)
    upstream = await nursery.start(serve_mock, app)
    budget = BudgetSpec(5000, "tokens", "day")
    state = StateConfig(backend="redis", url=redis.url, key_prefix="parkway-e2e:", timeout=1)
    config = replace(make_config(credentials=(replace(TEST_CREDENTIAL, user_budget=budget),)), state=state)
    parkway = await run_parkway(nursery, config)
    # One request settled first: Redis has the settle script cached, as it has in a running
    # deployment (one it must first load could never run from the stalled EVALSHA: NOSCRIPT).
    body = chat(50, stream=True)
    with watch_logs() as logs:
        first = await post(parkway.port, signed(parkway.base, upstream), chat(20))
        assert first.status == 200
        # Its charge is settled before its line is logged: on a loaded machine it could still be
        # on its way to Redis when Redis stops below, and be a second unknown charge.
        with trio.fail_after(10):
            await logs.wait_for(event="request", request_id=first.headers["x-request-id"])
        stream = await Call.open(parkway.port, "POST", signed(parkway.base, upstream), body=body)
        with trio.fail_after(10):
            await stream.read_until(b'"role":"assistant"')  # held in Redis, streaming
        redis.process.send_signal(signal.SIGSTOP)  # hung, not down: the charge is sent, not answered
        try:
            with trio.fail_after(20):
                reply = await stream.finish()
                line = await logs.wait_for(event="request", request_id=reply.headers["x-request-id"])
            assert reply.status == 200
            [unknown] = logs.find(event="budget_charge_unknown")
            assert unknown["charge"] == line["budget_charge"] == 9 + 50
            assert "may be recorded when Redis answers" in unknown["reason"]
            assert not logs.find(event="budget_charge_lost")
        finally:
            redis.process.send_signal(signal.SIGCONT)
    await levels_become(redis, alice_key(parkway, budget), Level(9 + 20 + 9 + 50, 0))  # charged, hold dropped
    parkway.parkway.shutdown()


async def test_a_realtime_session_is_closed_with_1008_once_it_used_its_hold(start_parkway, nursery):
    realtime = await nursery.start(RealtimeUpstream().serve)  # each response.done reports 18 tokens
    budget = BudgetSpec(60, "tokens", "day")
    parkway = await start_parkway(credentials=(replace(TEST_CREDENTIAL, user_budget=budget),))
    parkway.parkway.gateway.apply(replace(parkway.config, budgets=BudgetsConfig(session_hold=30)))
    url = sign(parkway.base, realtime.url, signer="proxy.signing", params={"pw_user": "alice"})
    parts = urlsplit(url)
    with watch_logs() as logs:
        with trio.fail_after(10):
            async with ws_client(parkway.port, f"{parts.path}?{parts.query}") as ws:
                assert json.loads(await ws.get_message())["type"] == "session.created"
                for _ in range(2):  # 18 tokens, then 36: past the 30 held
                    await ws.send_message(event("response.create"))
                    for _ in range(4):
                        last = json.loads(await ws.get_message())
                    assert last["type"] == "response.done"
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
        line = await logs.wait_for(event="request", status=101)
    assert closed.value.reason.code == 1008 and "used 36 tokens of the 30" in closed.value.reason.reason
    assert (line["outcome"], line["client_close_code"], line["closed_by"]) == ("budget_exhausted", 1008, "parkway")
    assert (line["budget_hold"], line["budget_charge"], line["budget_estimate"]) == (30, 36, "usage")
    key = budget_key("user", "app", "alice", budget, parkway.parkway.gateway.clock())
    assert (await parkway.parkway.gateway.budgets.levels([key]))[0] == Level(36, 0)
    # 36 spent + 30 more to hold would pass 60: the next session is refused before its 101.
    with pytest.raises(ConnectionRejected) as rejected:
        async with ws_client(parkway.port, f"{parts.path}?{parts.query}"):
            pass
    assert rejected.value.status_code == 429
    assert json.loads(rejected.value.body or b"")["error"]["code"] == "budget_exhausted"


# --- spend budgets ------------------------------------------------------------------------------------

PRICES = PriceTable((Price("mock-*", input=1000.0, output=2000.0, cached_input=500.0),), version="test-2026-12")


async def test_a_usd_budget_charges_the_price_table_and_refuses_unpriced_models(start_parkway, mock):
    app, upstream = mock
    # $0.50 a day; each request may cost (len(body) + 100 output) * $0.001-0.002: about $0.28 held.
    budget = BudgetSpec(NANO_USD // 2, USD, "day")
    parkway = await start_parkway(credentials=(replace(TEST_CREDENTIAL, user_budget=budget),))
    parkway.parkway.gateway.apply(replace(parkway.config, budgets=BudgetsConfig(price_table=PRICES)))

    unpriced = await post(parkway.port, signed(parkway.base, upstream), chat(100, model="gpt-unknown"))
    assert (unpriced.status, unpriced.code) == (403, "model_unpriced")
    assert app.requests == []

    with watch_logs() as logs:
        first = await post(parkway.port, signed(parkway.base, upstream), chat(100))
        line = await logs.wait_for(event="request", request_id=first.headers["x-request-id"])
    assert first.status == 200
    assert line["budget_charge_usd"] == pytest.approx((9 * 1000 + 100 * 2000) / 1e6)
    assert line["prices_version"] == "test-2026-12"
    policy = first.headers["ratelimit-policy"]
    assert policy == '"user-day-usd";q=500000;w=86400'  # micro-dollars
    second = await post(parkway.port, signed(parkway.base, upstream), chat(100))
    third = await post(parkway.port, signed(parkway.base, upstream), chat(100))
    assert second.status == 200  # 0.209 spent + 0.28 held <= 0.5
    assert (third.status, third.code) == (429, "budget_exhausted")
    assert len(app.requests) == 2


# --- Redis: exact across processes, leases --------------------------------------------------------------


def budget_toml(port: int, admin_port: int, redis: RedisServer, lease_ttl: float = 60) -> str:
    text = redis_parkway_toml(
        port=port,
        admin_port=admin_port,
        redis_url=redis.url,
        failure_policy="closed",
        credentials=[
            {
                "id": "app",
                "secret": "s3cret",
                "user_budget": {"tokens": 1000, "per": "day"},
                "headers": {"Authorization": "Bearer sk-upstream-key"},
            }
        ],
    )
    # A loaded test machine can take longer than the usual 0.5 s for a script; closed would then be 503.
    return text.replace("[state]\n", f"[state]\nlease_ttl = {lease_ttl}\n").replace("timeout = 0.5", "timeout = 5")


async def test_two_processes_on_one_redis_never_overspend_one_budget(processes: ProcessGroup, redis, mock, tmp_path):
    app, upstream = mock
    started = []
    for i in range(2):
        port, admin_port = free_port(), free_port()
        path = tmp_path / f"parkway-{i}.toml"
        path.write_text(budget_toml(port, admin_port, redis))
        started.append(await processes.spawn(path, port, admin_port=admin_port))
    for process in started:
        await process.logs.wait_for(event="startup", timeout=10)
    body = chat(200)
    replies: list[Reply] = []

    async def one(i: int) -> None:
        process = started[i % 2]
        replies.append(await post(process.port, signed(process.base, upstream), body))

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(one, i)

    served = [r for r in replies if r.status == 200]
    assert len(served) >= 3
    others = [(r.status, r.body[:200]) for r in replies if r.status != 200]
    assert all(r.status == 429 and r.code == "budget_exhausted" for r in replies if r.status != 200), others
    assert len(app.requests) == len(served)
    assert sum(r.json()["usage"]["total_tokens"] for r in served) == served_usage(app) <= 1000
    other = await post(started[1].port, signed(started[1].base, upstream, "bob"), body)
    assert other.status == 200

    # Every request logged (so settled): the operator's view from the shared state.
    await started[0].logs.wait_for(count=20, event="request", timeout=10)
    await started[1].logs.wait_for(count=21, event="request", timeout=10)
    shown = await trio.run_process(
        [sys.executable, "-m", "proxy", "budget", "show", "--credential", "app", "--user", "alice",
         "--config", str(tmp_path / "parkway-0.toml")],
        capture_stdout=True, capture_stderr=True,
    )  # fmt: skip
    spent = served_usage(app) - (9 + 200)  # bob's request is not alice's
    assert (
        shown.stdout.decode()
        .strip()
        .startswith(
            f"user-day: limit 1000 tokens, spent {spent} tokens, held 0 tokens, remaining {1000 - spent} tokens; window "
        )
    ), shown.stderr


async def test_a_killed_process_holds_are_released_after_the_lease(
    processes: ProcessGroup, redis, nursery, tmp_path: Path
):
    app = MockOpenAI(text=WORDS, delay=0.2, created=CREATED)
    upstream = await nursery.start(serve_mock, app)
    port, admin_port = free_port(), free_port()
    path = tmp_path / "parkway.toml"
    path.write_text(budget_toml(port, admin_port, redis, lease_ttl=1))
    process = await processes.spawn(path, port, admin_port=admin_port)
    await process.logs.wait_for(event="startup", timeout=10)
    body = chat(300, stream=True)
    stream = await Call.open(port, "POST", signed(process.base, upstream), body=body)
    with trio.fail_after(5):
        await stream.read_until(b'"role":"assistant"')

    key = budget_key("user", "app", "alice", BudgetSpec(1000, "tokens", "day"), datetime.now(UTC))
    async with RedisBudgets(redis.url, key_prefix="parkway-e2e:", lease_ttl=1) as store:
        [level] = await store.levels([key])
        assert level.held == len(body) + 300  # the stream's hold, kept alive by its process
        process.signal(signal.SIGKILL)
        await process.wait_exit()
        await stream.aclose()
        with trio.fail_after(5):  # the lease (1 s) runs out; nothing settles it
            while (await store.levels([key]))[0].held:
                await trio.sleep(0.1)
        [level] = await store.levels([key])
    assert (level.spent, level.held) == (0, 0)


async def test_redis_unreachable_follows_the_failure_policy(redis: RedisServer) -> None:
    spec = BudgetSpec(1000, "tokens", "day")
    cost = request_cost(chat(100), path=CHAT, settings=BudgetsConfig(), cap=None, want_usage=True)
    budgets, _ = applied_budgets("app", None, "alice", spec, cost, PriceTable(), datetime.now(UTC))
    async with (
        RedisBudgets(redis.url, failure_policy="closed", retry_interval=0.05) as closed,
        RedisBudgets(redis.url, failure_policy="open", retry_interval=0.05) as opened,
    ):
        assert (await closed.reserve(budgets, "1")).levels[0].held == cost.tokens
        await redis.kill()
        with pytest.raises(Overloaded) as info:
            await closed.reserve(budgets, "2")
        assert info.value.code == "state_unavailable" and info.value.status == 503
        admitted = await opened.reserve(budgets, "3")
        assert admitted.allowed and not admitted.enforced
        # Refused at once, or skipped by the outage policy: the charge surely was not written.
        assert await opened.settle(budgets, "3", [10]) is Settlement.NOT_RECORDED


async def test_a_settlement_is_unknown_while_redis_stalls_runs_when_it_resumes_and_not_recorded_when_it_is_down(
    redis: RedisServer,
) -> None:
    spec = BudgetSpec(1000, "tokens", "day")
    cost = request_cost(chat(100), path=CHAT, settings=BudgetsConfig(), cap=None, want_usage=True)
    budgets, _ = applied_budgets("app", None, "alice", spec, cost, PriceTable(), datetime.now(UTC))
    key = budgets[0].key
    with trio.fail_after(30):
        async with RedisBudgets(redis.url, key_prefix="parkway-e2e:", timeout=1, retry_interval=0) as store:
            assert (await store.reserve(budgets, "0")).allowed
            assert await store.settle(budgets, "0", [5]) is Settlement.RECORDED  # the scripts are cached
            assert (await store.reserve(budgets, "1")).allowed
            redis.process.send_signal(signal.SIGSTOP)  # hung, not down: the script is written, not answered
            try:
                assert await store.settle(budgets, "1", [10]) is Settlement.UNKNOWN
            finally:
                redis.process.send_signal(signal.SIGCONT)
            await levels_become(redis, key, Level(5 + 10, 0))  # it ran once Redis resumed: hold dropped, charged
            assert (await store.reserve(budgets, "2")).allowed  # on the connection it left, if still there
            await redis.kill()  # down: the connection is refused, nothing is sent
            assert await store.settle(budgets, "2", [20]) is Settlement.NOT_RECORDED
