"""proxy.cache.flight: single flight, the recorder, storing, replay. Trio, with the autojump clock for time."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from proxy.cache.entry import CacheEntry
from proxy.cache.flight import (
    ALONE,
    FOLLOW,
    LEAD,
    FellBehind,
    Flight,
    LeaderFailed,
    MemoryStore,
    ResponseCache,
    follow,
    open_cache,
    replay,
)
from proxy.cache.policy import CacheConfig

SSE = ((b"content-type", b"text/event-stream"),)
EVENTS = [b'data: {"n":%d}\n\n' % i for i in range(5)] + [b"data: [DONE]\n\n"]


def make_cache(**config: object) -> ResponseCache:
    settings = CacheConfig(**config)  # type: ignore[arg-type]
    return ResponseCache(settings, MemoryStore(settings.max_bytes))


def lead(cache: ResponseCache, key: str = "k", *, ttl: float = 60, store: bool = True, max_bytes: int = 1 << 20):
    role, flight = cache.join_nowait(key, ttl=ttl, store=store, max_entry_bytes=max_bytes)
    assert role == LEAD and flight is not None
    return flight


def join(cache: ResponseCache, key: str = "k") -> tuple[str, Flight | None]:
    return cache.join_nowait(key, ttl=60, store=True, max_entry_bytes=1 << 20)


class Client:
    """A follower's client: what it received and when (trio time)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.times: list[float] = []
        self.error: Exception | None = None
        self.done = trio.Event()

    async def send(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.times.append(trio.current_time())

    async def follow(self, flight: Flight) -> None:
        try:
            if await flight.wait_head() is None:
                self.error = RuntimeError("own attempt")
                return
            await follow(flight, self.send)
        except (LeaderFailed, FellBehind) as exc:
            self.error = exc
        finally:
            self.done.set()


async def test_memory_store_ttl(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore(1 << 20)
    now = store.clock()
    entry = CacheEntry(200, SSE, (b"x",), (0.0,), now, 10.0)
    assert (await store.put("k", entry)).stored
    await trio.sleep(9.9)
    assert await store.get("k") == entry
    await trio.sleep(0.2)
    assert await store.get("k") is None
    assert store.stats() == (0, 0) and store.healthy()


async def test_followers_receive_the_leaders_chunks_as_they_arrive(autojump_clock: trio.testing.MockClock) -> None:
    cache = make_cache()
    flight = lead(cache)
    clients = [Client() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        for client in clients:
            role, followed = join(cache)
            assert (role, followed) == (FOLLOW, flight)
            nursery.start_soon(client.follow, followed)
        async with cache.leading(flight):
            await trio.sleep(1)
            flight.begin(200, SSE, share=True)
            for i, event in enumerate(EVENTS):
                flight.feed(event)
                await trio.sleep(1)
                # Each follower has this event before the leader gets the next one.
                assert all(len(c.chunks) == i + 1 for c in clients)
            flight.usage = (7, 3)
            flight.finish(True)
        assert flight.stored
    for client in clients:
        assert client.error is None and client.chunks == EVENTS
        assert client.times[0] < clients[0].times[-1]
    assert cache.flights == 0
    stored = await cache.lookup("k")
    assert stored is not None and stored.chunks == tuple(EVENTS) and stored.headers == SSE
    assert stored.offsets == tuple(float(i) for i in range(len(EVENTS)))  # one second apart, as they came
    assert (stored.prompt_tokens, stored.completion_tokens) == (7, 3)


async def test_max_followers_then_alone() -> None:
    cache = make_cache(max_followers=2)
    lead(cache)
    assert join(cache)[0] == FOLLOW and join(cache)[0] == FOLLOW
    assert join(cache) == (ALONE, None)
    assert join(cache, "other")[0] == LEAD


async def test_leader_failing_before_its_head_frees_followers_for_their_own_attempt() -> None:
    cache = make_cache()
    flight = lead(cache)
    client = Client()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.follow, join(cache)[1])
        with pytest.raises(ZeroDivisionError):
            async with cache.leading(flight):
                await trio.testing.wait_all_tasks_blocked()
                raise ZeroDivisionError  # e.g. the upstream refused the connection
    assert str(client.error) == "own attempt" and client.chunks == []
    assert cache.flights == 0 and await cache.lookup("k") is None


@pytest.mark.parametrize("status", [429, 500, 404])
async def test_an_answer_that_is_not_shared_is_neither_followed_nor_stored(status: int) -> None:
    cache = make_cache()
    flight = lead(cache)
    client = Client()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.follow, join(cache)[1])
        async with cache.leading(flight):
            flight.begin(status, SSE, share=False)
            assert join(cache) == (ALONE, None)  # nobody joins an unshared answer
            flight.feed(b"error")
            flight.finish(True)
    assert str(client.error) == "own attempt"
    assert not flight.stored and await cache.lookup("k") is None


async def test_leader_failing_mid_answer_fails_its_followers_and_stores_nothing() -> None:
    cache = make_cache()
    flight = lead(cache)
    client = Client()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.follow, join(cache)[1])
        async with cache.leading(flight):
            flight.begin(200, SSE, share=True)
            flight.feed(EVENTS[0])
            await trio.testing.wait_all_tasks_blocked()
            flight.finish(False)  # the upstream cut the stream
    assert isinstance(client.error, LeaderFailed) and client.chunks == EVENTS[:1]
    assert not flight.stored and await cache.lookup("k") is None


async def test_cancelled_leader_fails_its_followers() -> None:
    cache = make_cache()
    flight = lead(cache)
    client = Client()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.follow, join(cache)[1])
        with trio.CancelScope() as scope:
            async with cache.leading(flight):
                flight.begin(200, SSE, share=True)
                flight.feed(EVENTS[0])
                scope.cancel()  # the leader's client left: the relay is cancelled
                await trio.sleep_forever()
    assert isinstance(client.error, LeaderFailed)
    assert cache.flights == 0 and await cache.lookup("k") is None


async def test_a_stuck_follower_never_slows_the_leader() -> None:
    cache = make_cache()
    flight = lead(cache)
    stuck = trio.Event()
    received: list[bytes] = []

    async def never_reads(chunk: bytes) -> None:
        received.append(chunk)
        await stuck.wait()  # a client that stopped reading

    async with trio.open_nursery() as nursery:
        follower = join(cache)[1]
        assert follower is not None

        async def run_follower() -> None:
            await follower.wait_head()
            await follow(follower, never_reads)

        nursery.start_soon(run_follower)
        async with cache.leading(flight):
            flight.begin(200, SSE, share=True)
            flight.feed(EVENTS[0])
            await trio.testing.wait_all_tasks_blocked()  # the follower took it and is stuck writing
            for event in EVENTS[1:]:
                flight.feed(event)  # synchronous: there is nothing to wait for
            flight.finish(True)
        # The leader is done and the answer stored while the follower still holds its first chunk.
        assert flight.stored and received == EVENTS[:1]
        stuck.set()
    assert received == EVENTS


async def test_a_late_follower_of_a_finished_flight_gets_the_whole_answer() -> None:
    cache = make_cache()
    flight = lead(cache)
    async with cache.leading(flight):
        flight.begin(200, SSE, share=True)
        for event in EVENTS:
            flight.feed(event)
        flight.finish(True)
        role, same = join(cache)  # joined while the entry is being stored
        assert role == FOLLOW and same is flight
        client = Client()
        await client.follow(flight)
    assert client.error is None and client.chunks == EVENTS


async def test_an_answer_too_big_to_store_cuts_loose_a_follower_that_falls_behind() -> None:
    cache = make_cache(follower_lag_bytes=30)
    flight = lead(cache, max_bytes=40)
    follower = join(cache)[1]
    assert follower is not None
    async with cache.leading(flight):
        flight.begin(200, SSE, share=True)
        for _ in range(3):
            flight.feed(b"x" * 20)  # 60 bytes > 40: not kept whole; the window holds the last 30
        assert join(cache) == (ALONE, None)  # a new follower would need chunks that are gone
        flight.finish(True)
        client = Client()
        await client.follow(follower)
    assert isinstance(client.error, FellBehind) and client.chunks == []
    assert not flight.stored and await cache.lookup("k") is None


async def test_not_stored_when_the_plan_says_so() -> None:
    """A client's Cache-Control no-store still lets others follow, but nothing is written."""
    cache = make_cache()
    flight = lead(cache, store=False)
    async with cache.leading(flight):
        flight.begin(200, SSE, share=True)
        flight.feed(b"x")
        flight.finish(True)
    assert not flight.stored and await cache.lookup("k") is None


async def test_store_evictions_are_reported_on_the_flight() -> None:
    one = CacheEntry(200, (), (b"x" * 100,), (0.0,), 0.0, 60.0).size
    cache = make_cache(max_bytes=one + 200)
    for key in ("a", "b"):
        flight = lead(cache, key)
        async with cache.leading(flight):
            flight.begin(200, (), share=True)
            flight.feed(b"x" * 100)
            flight.finish(True)
    assert flight.stored and flight.evicted == 1


async def test_replay_instant_and_paced(autojump_clock: trio.testing.MockClock) -> None:
    entry = CacheEntry(200, SSE, tuple(EVENTS[:3]), (0.0, 0.5, 2.0), 0.0, 60.0)
    instant, paced = Client(), Client()
    start = trio.current_time()
    await replay(entry, instant.send)
    assert instant.chunks == EVENTS[:3] and instant.times == [start] * 3  # separate writes, no waiting
    start = trio.current_time()
    await replay(entry, paced.send, paced=True)
    assert paced.chunks == EVENTS[:3]
    assert [round(t - start, 6) for t in paced.times] == [0.0, 0.5, 2.0]


async def test_open_cache_memory() -> None:
    async with open_cache(CacheConfig(max_bytes=1234)) as cache:
        assert isinstance(cache.store, MemoryStore) and cache.store.cache.max_bytes == 1234


# --- the fetch is the cache's task; every client reads at its own pace (issue 19, finding 2) -----------


def feeding(chunks: list[bytes], fed: list[bytes]):
    """A fetch that sends ``chunks`` as fast as the flight takes them, noting each one fed."""

    async def fetch(flight: Flight) -> None:
        flight.begin(200, SSE, share=True)
        for chunk in chunks:
            await flight.room(len(chunk))
            flight.feed(chunk)
            fed.append(chunk)
            await trio.sleep(0)
        flight.finish(True)

    return fetch


async def test_a_stalled_reader_delays_no_other_reader() -> None:
    chunks = [b"%03d" % i * 10 for i in range(100)]  # 3,000 bytes, kept whole
    fed: list[bytes] = []
    stuck = trio.Event()
    async with open_cache(CacheConfig()) as cache:
        flight = lead(cache)
        assert join(cache)[0] == FOLLOW
        cache.start(flight, feeding(chunks, fed))
        got: list[bytes] = []

        async def stalled(chunk: bytes) -> None:
            await stuck.wait()  # the starting client stops reading after its first chunk

        async def reader(send) -> None:  # type: ignore[no-untyped-def]
            await flight.head()
            await follow(flight, send)

        async def collect(chunk: bytes) -> None:
            got.append(chunk)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader, stalled)
                await reader(collect)
                assert got == chunks and fed == chunks  # all of it, while the other reader is stuck
                nursery.cancel_scope.cancel()
        assert await cache.lookup("k") is not None


async def test_a_lone_reader_paces_an_answer_too_big_to_keep() -> None:
    """Past max_entry_bytes only a window is held: a lone reader slows the upstream rather than be cut."""
    chunks = [b"x" * 10] * 50
    fed: list[bytes] = []
    release = trio.Event()
    async with open_cache(CacheConfig(follower_lag_bytes=30)) as cache:
        flight = lead(cache, max_bytes=40)
        cache.start(flight, feeding(chunks, fed))
        got: list[bytes] = []

        async def slow(chunk: bytes) -> None:
            got.append(chunk)
            if len(got) == 5:
                await release.wait()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: follow_after_head(flight, slow))
                await trio.testing.wait_all_tasks_blocked()
                assert len(fed) <= 5 + 3  # the fetch waits for the reader: at most the window ahead
                release.set()
        assert got == chunks and flight.complete and not flight.stored


async def follow_after_head(flight: Flight, send) -> None:  # type: ignore[no-untyped-def]
    await flight.head()
    await follow(flight, send)


async def test_the_fetch_stops_when_its_last_reader_leaves() -> None:
    cancelled = trio.Event()

    async def endless(flight: Flight) -> None:
        flight.begin(200, SSE, share=True)
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async with open_cache(CacheConfig()) as cache:
        flight = lead(cache)
        assert join(cache)[0] == FOLLOW
        cache.start(flight, endless)
        await flight.head()
        flight.leave()  # the starting client left: the follower still reads
        await trio.testing.wait_all_tasks_blocked()
        assert not cancelled.is_set()
        flight.leave()  # the last one
        with trio.fail_after(5):
            await cancelled.wait()
            await flight.settled.wait()
        assert cache.flights == 0


async def test_a_fetch_failing_before_its_head_answers_the_starting_client() -> None:
    async def refused(flight: Flight) -> None:
        raise ConnectionRefusedError("no upstream")

    async with open_cache(CacheConfig()) as cache:
        flight = lead(cache)
        role, follower = join(cache)
        cache.start(flight, refused)
        with pytest.raises(ConnectionRefusedError):
            await flight.head()
        assert follower is not None and await follower.wait_head() is None  # the follower tries itself


async def test_a_refresh_follows_only_an_answer_not_begun_yet() -> None:
    """no-cache asks for an answer produced after the request: one already under way is not that."""
    cache = make_cache()
    flight = lead(cache)
    assert cache.join_nowait("k", ttl=60, store=True, max_entry_bytes=1 << 20, refresh=True)[0] == FOLLOW
    flight.begin(200, SSE, share=True)
    assert cache.join_nowait("k", ttl=60, store=True, max_entry_bytes=1 << 20, refresh=True) == (ALONE, None)
    assert join(cache)[0] == FOLLOW
