"""proxy.limits.state and proxy.limits.redis: the backends behind limits and single-use URLs.

The Redis tests run a real ``redis-server`` (support.redis). Two :class:`RedisState`
instances, each with its own coredis client and connections, stand in for two Parkway
processes: they must enforce one limit and one single-use set. The server is killed (SIGKILL),
frozen (SIGSTOP: a Redis that hangs) and restarted mid-test. The pure parts (outages, the
state config, the memory backend) are tests/unit/limits/test_outage.py and test_state.py.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator

import coredis
import pytest
import trio
from structlog.testing import capture_logs

from proxy._redis import without_credentials
from proxy.config import StateConfig
from proxy.errors import Overloaded
from proxy.limits.limiter import ALLOWED, CONCURRENCY, CREDENTIAL, RATE, USER, LimitKey, LimitSpec
from proxy.limits.redis import RedisState
from proxy.limits.state import StateBackend, open_state
from support.redis import RedisServer

# --- Redis ------------------------------------------------------------------------------------------

GUARD = 10.0  # seconds: no Redis test may take longer


@pytest.fixture
async def raw(redis: RedisServer) -> AsyncIterator[coredis.Redis]:
    """A plain client to look at what the states wrote."""
    async with coredis.Redis.from_url(redis.url, decode_responses=True) as client:
        yield client


async def redis_ms(raw: coredis.Redis) -> int:
    """Redis's own clock, which the scripts use, in milliseconds."""
    seconds, micros = await raw.eval("return redis.call('TIME')", keys=[], args=[])
    return int(seconds) * 1000 + int(micros) // 1000


def cred(**spec: object) -> list[LimitKey]:
    return [LimitKey(CREDENTIAL, "app", LimitSpec(**spec))]


async def test_two_processes_share_one_rate_limit(redis: RedisServer) -> None:
    keys = cred(rate=1 / 60, burst=3)  # 1 per minute, 3 at once
    with trio.fail_after(GUARD):
        async with RedisState(redis.url) as a, RedisState(redis.url) as b:
            results = [await state.acquire(keys, 0.0) for state in (a, b, a)]
            assert all(d.allowed for d in results)
            for state in (b, a):
                decision = await state.acquire(keys, 0.0)
                assert not decision.allowed
                assert (decision.scope, decision.limit, decision.key) == (CREDENTIAL, RATE, "app")
                assert 55 < decision.retry_after <= 60
                assert decision.refusal().retry_after == 60
            other = await b.acquire([LimitKey(CREDENTIAL, "other", LimitSpec(rate=1 / 60, burst=1))], 0.0)
            assert other.allowed  # keys are separate


async def test_two_processes_share_one_concurrency_limit(redis: RedisServer) -> None:
    keys = cred(max_concurrent=2)
    with trio.fail_after(GUARD):
        async with RedisState(redis.url, concurrency_retry_after=3.0) as a, RedisState(redis.url) as b:
            first, second = await a.acquire(keys, 0.0), await b.acquire(keys, 0.0)
            assert first.allowed and second.allowed
            refused = await a.acquire(keys, 0.0)
            assert (refused.allowed, refused.limit, refused.retry_after) == (False, CONCURRENCY, 3.0)
            await b.release(second.lease)
            await b.release(second.lease)  # twice: harmless
            again = await a.acquire(keys, 0.0)
            assert again.allowed
            assert not (await b.acquire(keys, 0.0)).allowed
            await a.release(first.lease)
            await a.release(again.lease)


async def test_concurrent_arrivals_never_overshoot(redis: RedisServer) -> None:
    """60 requests at once through two processes against 10 slots: exactly 10 get one."""
    keys = cred(max_concurrent=10)
    allowed: list[bool] = []
    with trio.fail_after(GUARD):
        async with RedisState(redis.url, timeout=2.0) as a, RedisState(redis.url, timeout=2.0) as b:

            async def arrive(state: RedisState) -> None:
                allowed.append((await state.acquire(keys, 0.0)).allowed)

            async with trio.open_nursery() as nursery:
                for i in range(60):
                    nursery.start_soon(arrive, (a, b)[i % 2])
    assert allowed.count(True) == 10 and len(allowed) == 60


async def test_refusal_takes_nothing_from_other_keys(redis: RedisServer) -> None:
    credential = LimitKey(CREDENTIAL, "app", LimitSpec(rate=1 / 60, burst=1))
    user = LimitKey(USER, "app/alice", LimitSpec(max_concurrent=1))
    with trio.fail_after(GUARD):
        async with RedisState(redis.url) as a, RedisState(redis.url) as b:
            held = await a.acquire([user], 0.0)
            refused = await b.acquire([credential, user], 0.0)
            assert (refused.scope, refused.limit, refused.key) == (USER, CONCURRENCY, "app/alice")
            await a.release(held.lease)
            assert (await b.acquire([credential, user], 0.0)).allowed  # the credential's token was kept


async def test_two_processes_share_one_single_use_set(redis: RedisServer, raw: coredis.Redis) -> None:
    now = time.time()
    with trio.fail_after(GUARD):
        async with RedisState(redis.url, key_prefix="pw:") as a, RedisState(redis.url, key_prefix="pw:") as b:
            assert await a.check_and_add_signature("ab" * 32, now + 300, now)
            assert not await b.check_and_add_signature("ab" * 32, now + 300, now)
            assert not await a.check_and_add_signature("ab" * 32, now + 300, now)
            assert await b.check_and_add_signature("cd" * 32, now + 300, now)
            assert await a.check_and_add_signature("ef" * 32, now - 1, now)  # expired: not remembered
            # Remembered exactly as long as the URL lives: bounded memory in Redis too.
            assert 299_000 < await raw.pttl("pw:su:" + "ab" * 32) <= 300_000
            assert await raw.exists(["pw:su:" + "ef" * 32]) == 0


async def test_a_crashed_process_frees_its_slots(redis: RedisServer, raw: coredis.Redis) -> None:
    keys = cred(max_concurrent=1)
    with trio.fail_after(GUARD):
        async with RedisState(redis.url, lease_ttl=30.0) as crashed:
            lease = (await crashed.acquire(keys, 0.0)).lease
        # Left without releasing (a crash): the slot is held, but only until the lease expires.
        lease_key = "parkway:conc:credential:app"
        expires = await raw.zscore(lease_key, lease.id)
        assert 29_000 < expires - await redis_ms(raw) <= 30_000
        assert 30_000 < await raw.pttl(lease_key) <= 31_000
        async with RedisState(redis.url) as survivor:
            assert not (await survivor.acquire(keys, 0.0)).allowed
            await raw.zadd(lease_key, {lease.id: await redis_ms(raw) - 1})  # ... 30 s later
            assert (await survivor.acquire(keys, 0.0)).allowed


async def test_live_leases_are_refreshed_released_ones_are_not(redis: RedisServer, raw: coredis.Redis) -> None:
    keys = cred(max_concurrent=5)
    lease_key = "parkway:conc:credential:app"
    with trio.fail_after(GUARD):
        async with RedisState(redis.url, lease_ttl=30.0) as state:
            live = (await state.acquire(keys, 0.0)).lease
            done = (await state.acquire(keys, 0.0)).lease
            soon = await redis_ms(raw) + 100
            await raw.zadd(lease_key, {live.id: soon, done.id: soon})
            await state.release(done)
            await state.refresh_now()
            assert await raw.zscore(lease_key, live.id) - await redis_ms(raw) > 29_000
            assert await raw.zscore(lease_key, done.id) is None


async def test_redis_killed_and_restarted(redis: RedisServer) -> None:
    """Fail open serves, fail closed refuses, each logs once; both recover when Redis returns."""
    keys = cred(max_concurrent=1)
    now = time.time()
    with trio.fail_after(GUARD):
        async with (
            RedisState(redis.url, failure_policy="open", retry_interval=0.0) as open_,
            RedisState(redis.url, failure_policy="closed", retry_interval=0.0) as closed,
        ):
            held = await open_.acquire(keys, 0.0)  # connections established, a slot taken
            assert held.allowed and not (await closed.acquire(keys, 0.0)).allowed
            with capture_logs() as logs:
                await redis.kill()
                for _ in range(3):
                    decision = await open_.acquire(keys, 0.0)
                    assert decision is ALLOWED  # served, without limits
                    assert await open_.check_and_add_signature("ab" * 32, now + 60, now)
                    with pytest.raises(Overloaded) as info:
                        await closed.acquire(keys, 0.0)
                    assert (info.value.status, info.value.code, info.value.retry_after) == (503, "state_unavailable", 1)
                    assert "Redis" in info.value.message and "failure_policy is 'closed'" in info.value.message
                    with pytest.raises(Overloaded):
                        await closed.check_and_add_signature("ab" * 32, now + 60, now)
                await open_.release(held.lease)  # Redis down: the lease just expires later
                assert not open_.healthy() and not closed.healthy()
                down = [e for e in logs if e["event"] == "state_unavailable"]
                assert [e["failure_policy"] for e in down] == ["open", "closed"]  # once per outage each
                assert all(e["log_level"] == "error" and e["redis"] == redis.url for e in down)

                await redis.start()  # same port; data gone, as after a crash without persistence
                assert (await open_.acquire(keys, 0.0)).allowed
                assert not (await closed.acquire(keys, 0.0)).allowed  # one limit again, shared
                assert open_.healthy() and closed.healthy()
                assert await closed.check_and_add_signature("ab" * 32, now + 60, now)
                assert not await open_.check_and_add_signature("ab" * 32, now + 60, now)
            recovered = [e for e in logs if e["event"] == "state_recovered"]
            assert len(recovered) == 2 and all(e["log_level"] == "warning" for e in recovered)


async def test_while_down_redis_is_tried_once_per_interval(redis: RedisServer) -> None:
    with trio.fail_after(GUARD):
        async with RedisState(redis.url, failure_policy="open", retry_interval=3600.0) as state:
            assert (await state.acquire(cred(max_concurrent=1), 0.0)).allowed
            await redis.kill()
            assert await state.acquire(cred(max_concurrent=1), 0.0) is ALLOWED
            await redis.start()
            # Back, but the next attempt is an hour away: requests follow the policy without trying.
            assert await state.acquire(cred(max_concurrent=1), 0.0) is ALLOWED
            assert not state.healthy()


# Long enough that a live Redis answers within it on a loaded machine (the calls before and
# after the hang must succeed), short enough that the hung calls show they were cut by it.
HUNG_TIMEOUT = 0.5


async def test_a_hung_redis_costs_at_most_the_timeout(redis: RedisServer) -> None:
    with trio.fail_after(GUARD):
        async with (
            RedisState(redis.url, failure_policy="open", timeout=HUNG_TIMEOUT, retry_interval=0.0) as open_,
            RedisState(redis.url, failure_policy="closed", timeout=HUNG_TIMEOUT, retry_interval=0.0) as closed,
        ):
            assert (await open_.acquire(cred(rate=100.0), 0.0)).allowed
            assert (await closed.acquire(cred(rate=100.0), 0.0)).allowed
            redis.process.send_signal(signal.SIGSTOP)
            try:
                start = trio.current_time()
                assert await open_.acquire(cred(rate=100.0), 0.0) is ALLOWED
                with pytest.raises(Overloaded):
                    await closed.acquire(cred(rate=100.0), 0.0)
                assert trio.current_time() - start < 5 * HUNG_TIMEOUT  # two calls, one timeout each
            finally:
                redis.process.send_signal(signal.SIGCONT)
            assert (await closed.acquire(cred(rate=100.0), 0.0)).allowed
            assert closed.healthy()


async def test_open_state_redis(redis: RedisServer) -> None:
    with trio.fail_after(GUARD):
        async with open_state(StateConfig(backend="redis", url=redis.url)) as state:
            assert isinstance(state, RedisState) and isinstance(state, StateBackend)
            assert (await state.acquire(cred(rate=1.0), 0.0)).allowed


@pytest.mark.parametrize(
    "url, logged",
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@redis.internal:6380/2", "redis://redis.internal:6380/2"),
        ("rediss://parkway:s3cret@redis.internal/0?timeout=1", "rediss://redis.internal/0"),
    ],
)
def test_log_lines_never_carry_redis_credentials(url: str, logged: str) -> None:
    assert without_credentials(url) == logged
