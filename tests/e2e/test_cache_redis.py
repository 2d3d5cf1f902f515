"""proxy.cache.redis: entries shared through a real redis-server, which is killed and restarted.

Two :class:`RedisStore` instances, each with its own coredis client, stand in for two Parkway
processes. A dead Redis must make the cache step aside (``CacheUnavailable``, one log line per
outage), never hang a request and never crash; once Redis is back, entries are written again.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator

import coredis
import pytest
import trio
from structlog.testing import capture_logs

from proxy.cache.entry import CacheEntry, encode_entry
from proxy.cache.flight import ResponseCache, open_cache
from proxy.cache.policy import CacheConfig, CacheUnavailable
from proxy.cache.redis import RedisStore
from support.redis import RedisServer

GUARD = 10.0  # seconds: no test here may take longer
SSE = ((b"content-type", b"text/event-stream"),)


@pytest.fixture
async def raw(redis: RedisServer) -> AsyncIterator[coredis.Redis]:
    async with coredis.Redis.from_url(redis.url) as client:
        yield client


def entry(
    ttl: float = 60.0, stored_at: float | None = None, chunks: tuple[bytes, ...] = (b"data: 1\n\n",)
) -> CacheEntry:
    return CacheEntry(
        200,
        SSE,
        chunks,
        tuple(0.1 * i for i in range(len(chunks))),
        time.time() if stored_at is None else stored_at,
        ttl,
    )


async def test_two_processes_share_entries_with_redis_ttls(redis: RedisServer, raw: coredis.Redis) -> None:
    stored = entry(ttl=30.0, chunks=(b"data: a\n\n", b"", b"data: [DONE]\n\n"))
    with trio.fail_after(GUARD):
        async with RedisStore(redis.url, key_prefix="t:") as a, RedisStore(redis.url, key_prefix="t:") as b:
            assert await b.get("k") is None
            assert (await a.put("k", stored)).stored
            assert await b.get("k") == stored  # byte for byte, chunk boundaries and offsets included
            assert 29_000 < await raw.pttl("t:k") <= 30_000  # Redis expires it
            assert a.stats() == (len(encode_entry(stored)), 1) and b.stats() == (0, 0)
            assert a.healthy() and b.healthy()


async def test_expired_by_our_clock_is_a_miss(redis: RedisServer) -> None:
    with trio.fail_after(GUARD):
        async with RedisStore(redis.url) as store:
            assert not (await store.put("gone", entry(ttl=5.0, stored_at=time.time() - 10))).stored
            assert (await store.put("k", entry(ttl=5.0))).stored
        later = time.time() + 6
        async with RedisStore(redis.url, clock=lambda: later) as store:
            assert await store.get("k") is None  # Redis still has it; its stored_at says it is stale


async def test_unreadable_value_is_a_miss(redis: RedisServer, raw: coredis.Redis) -> None:
    await raw.set("parkway:cache:k", b"not an entry")
    with trio.fail_after(GUARD), capture_logs() as logs:
        async with RedisStore(redis.url) as store:
            assert await store.get("k") is None
    assert [e["event"] for e in logs] == ["cache_entry_unreadable"]
    assert logs[0]["key"] == "k"


async def test_redis_killed_then_back(redis: RedisServer) -> None:
    with trio.fail_after(GUARD):
        async with RedisStore(redis.url, timeout=0.5, retry_interval=0.2) as store:
            assert (await store.put("k", entry())).stored
            with capture_logs() as logs:
                await redis.kill()
                for _ in range(3):
                    with pytest.raises(CacheUnavailable):
                        await store.get("k")
                with pytest.raises(CacheUnavailable):
                    await store.put("k2", entry())
                assert not store.healthy() and store.failures == 4
                down = [e for e in logs if e["event"] == "cache_unavailable"]
                assert len(down) == 1 and down[0]["redis"] == redis.url  # once per outage
                await redis.start()  # empty: no persistence
                await trio.sleep(0.25)  # past retry_interval, so the next operation tries Redis
                assert await store.get("k") is None
                assert store.healthy()
                assert (await store.put("k", entry())).stored
                assert await store.get("k") is not None
            assert [e["event"] for e in logs if e["event"].startswith("cache_")] == [
                "cache_unavailable",
                "cache_recovered",
            ]


async def test_a_hung_redis_is_bounded_by_the_timeout(redis: RedisServer) -> None:
    with trio.fail_after(GUARD):
        async with RedisStore(redis.url, timeout=0.3, retry_interval=5.0) as store:
            assert await store.get("k") is None
            assert redis.process is not None
            redis.process.send_signal(signal.SIGSTOP)
            try:
                start = trio.current_time()
                with pytest.raises(CacheUnavailable):
                    await store.get("k")
                with pytest.raises(CacheUnavailable):  # within retry_interval: no second wait
                    await store.get("k")
                assert trio.current_time() - start < 1.0
            finally:
                redis.process.send_signal(signal.SIGCONT)


async def test_open_cache_redis_takes_the_state_url(redis: RedisServer) -> None:
    with trio.fail_after(GUARD):
        async with open_cache(CacheConfig(backend="redis"), redis_url=redis.url) as cache:
            assert isinstance(cache, ResponseCache) and isinstance(cache.store, RedisStore)
            flight = cache.join_nowait("k", ttl=60, store=True, max_entry_bytes=1 << 20)[1]
            assert flight is not None
            async with cache.leading(flight):
                flight.begin(200, SSE, share=True)
                flight.feed(b"data: [DONE]\n\n")
                flight.finish(True)
            assert flight.stored
            hit = await cache.lookup("k")
            assert hit is not None and hit.chunks == (b"data: [DONE]\n\n",)


async def test_a_store_failure_while_storing_is_not_an_error(redis: RedisServer) -> None:
    """The answer reached the client; Redis dying before it is stored only means no entry."""
    with trio.fail_after(GUARD):
        async with open_cache(CacheConfig(backend="redis", url=redis.url, timeout=0.3)) as cache:
            flight = cache.join_nowait("k", ttl=60, store=True, max_entry_bytes=1 << 20)[1]
            assert flight is not None
            async with cache.leading(flight):
                flight.begin(200, SSE, share=True)
                flight.feed(b"x")
                flight.finish(True)
                await redis.kill()
            assert not flight.stored and cache.flights == 0
