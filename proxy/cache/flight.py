"""The response cache's Trio side: single flight, the recorder on the relay, replay of an entry.

Decisions live in :mod:`proxy.cache.policy` (may this request use the cache, the key, may this
answer be stored) and :mod:`proxy.cache.entry`; entries live in a store: :class:`MemoryStore`
here, or :class:`~proxy.cache.redis.RedisStore` shared by several processes.

Single flight: the first request for a key that is not stored becomes the *leader* of a
:class:`Flight` and goes upstream; identical requests arriving meanwhile *follow* it (at most
``max_followers``) and read the leader's chunks from the flight's :class:`~proxy.cache.entry.Recording`
as they arrive, each at its own pace. The leader never waits for a follower: chunks are appended
and followers woken, nothing more. The flight is the relay's observer (``feed``/``finish``); it is
stored only after ``finish(complete=True)``. A leader that fails before its head leaves followers
free to try again themselves; one that fails mid-answer makes every follower fail the same way
(:class:`LeaderFailed`), never a truncated answer passed off as complete.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import structlog
import trio

from .entry import CacheEntry, Header, Recording
from .memory import MemoryCache, Stored
from .policy import CacheConfig, CacheUnavailable, short_key

log = structlog.get_logger("parkway.cache")

LEAD, FOLLOW, ALONE = "lead", "follow", "alone"


class LeaderFailed(Exception):
    """The answer a follower was reading broke off before its end."""


class FellBehind(Exception):
    """A follower read too slowly for an answer too big to keep whole; it was cut loose."""


class CacheStore(Protocol):
    def clock(self) -> float:
        """The store's clock for ``stored_at`` and expiry (seconds)."""

    async def get(self, key: str) -> CacheEntry | None:
        """The fresh entry under ``key``, or None; raises :class:`CacheUnavailable`."""

    async def put(self, key: str, entry: CacheEntry) -> Stored:
        """Store ``entry``; raises :class:`CacheUnavailable`."""

    def stats(self) -> tuple[int, int]:
        """Bytes and entries held, as far as this process can tell."""

    def healthy(self) -> bool:
        """False while a shared store is unreachable."""


class MemoryStore:
    """Entries in this process's memory (:class:`~proxy.cache.memory.MemoryCache` on Trio's clock)."""

    def __init__(self, max_bytes: int):
        self.cache = MemoryCache(max_bytes)

    def clock(self) -> float:
        return trio.current_time()

    async def get(self, key: str) -> CacheEntry | None:
        return self.cache.get(key, trio.current_time())

    async def put(self, key: str, entry: CacheEntry) -> Stored:
        return self.cache.put(key, entry, trio.current_time())

    def stats(self) -> tuple[int, int]:
        return self.cache.bytes, len(self.cache)

    def healthy(self) -> bool:
        return True


class Flight:
    """One upstream call that identical requests share. Its leader calls :meth:`begin` with the
    upstream's head, then (as the relay's observer) :meth:`feed` per chunk and :meth:`finish`."""

    __slots__ = (
        "_head",
        "_lot",
        "accepting",
        "complete",
        "done",
        "evicted",
        "followers",
        "key",
        "max_bytes",
        "recording",
        "shared",
        "store",
        "stored",
        "ttl",
        "usage",
        "window_bytes",
    )  # fmt: skip

    def __init__(self, key: str, *, ttl: float, store: bool, max_bytes: int, window_bytes: int):
        self.key, self.ttl, self.store = key, ttl, store
        self.max_bytes, self.window_bytes = max_bytes, window_bytes
        self.recording: Recording | None = None
        self.shared = False  # followers may receive this answer
        self.accepting = True  # new followers may join
        self.followers = 0
        self.done = False
        self.complete = False
        self.stored = False
        self.evicted = 0  # entries the store pushed out to make room for this one
        self.usage: tuple[int, int] = (0, 0)  # prompt, completion tokens of the answer
        self._head = trio.Event()
        self._lot = trio.lowlevel.ParkingLot()

    # --- the leader -------------------------------------------------------------------------------

    def begin(self, status: int, headers: tuple[Header, ...], *, share: bool) -> None:
        """The upstream's head arrived. ``share``: the answer may be stored, so followers may have it
        too (an error or a ``private`` answer is not shared: each follower then goes upstream itself)."""
        self.recording = Recording(
            status, headers, started=trio.current_time(), max_bytes=self.max_bytes, window_bytes=self.window_bytes
        )
        self.shared = share
        self.store = self.store and share
        self.accepting = self.accepting and share
        self._head.set()

    def feed(self, data: bytes) -> None:
        recording = self.recording
        if recording is None or not data:
            return
        # bytes() keeps a bytes object as it is, and copies a view of a buffer the relay may reuse.
        recording.add(bytes(data), trio.current_time())
        if not recording.keeping:
            self.accepting = False  # a late follower would need chunks no longer held
        self._lot.unpark_all()

    def finish(self, complete: bool) -> None:
        """``complete``: the upstream's end of body arrived and everything reached the leader's client."""
        if self.done:
            return
        self.done = True
        self.complete = complete and self.recording is not None
        keeping = self.recording is not None and self.recording.keeping
        self.accepting = self.accepting and self.complete and keeping
        self._head.set()
        self._lot.unpark_all()

    def entry(self, stored_at: float) -> CacheEntry | None:
        """The answer to store, if it may be stored: complete, storable, within max_entry_bytes."""
        recording = self.recording
        if not (self.complete and self.store and recording is not None and recording.keeping):
            return None
        prompt, completion = self.usage
        return recording.entry(stored_at=stored_at, ttl=self.ttl, prompt_tokens=prompt, completion_tokens=completion)

    # --- followers --------------------------------------------------------------------------------

    async def wait_head(self) -> Recording | None:
        """The leader's answer to follow, or None: the leader failed before its head, or its answer
        is not one to share. Either way the follower makes its own attempt."""
        await self._head.wait()
        return self.recording if self.shared else None

    async def read(self, number: int) -> bytes | None:
        """Chunk ``number`` of the answer once it has arrived; None after the last one of a complete
        answer. Raises :class:`LeaderFailed` or :class:`FellBehind`."""
        recording = self.recording
        assert recording is not None, "wait_head() first"
        while number >= recording.end:
            if self.done:
                if self.complete:
                    return None
                raise LeaderFailed("the identical request this one was waiting on failed mid-answer")
            await self._lot.park()
        chunk = recording.get(number)
        if chunk is None:
            raise FellBehind("fell too far behind the identical request it was following")
        return chunk


class ResponseCache:
    """Lookups, single flight and storing, over one :class:`CacheStore`."""

    def __init__(self, config: CacheConfig, store: CacheStore):
        self.config = config
        self.store = store
        self._flights: dict[str, Flight] = {}

    @property
    def flights(self) -> int:
        return len(self._flights)

    async def lookup(self, key: str) -> CacheEntry | None:
        """The stored answer, or None; raises :class:`CacheUnavailable` (the caller goes upstream)."""
        return await self.store.get(key)

    def join_nowait(self, key: str, *, ttl: float, store: bool, max_entry_bytes: int) -> tuple[str, Flight | None]:
        """Decide, without waiting, how a request for ``key`` goes:

        * ``(LEAD, flight)``: no identical call is in flight; this request makes it. The flight is
          registered at once (so the next identical request follows it); the caller must run the
          rest of the request inside ``async with cache.leading(flight)``.
        * ``(FOLLOW, flight)``: an identical call is in flight and takes followers.
        * ``(ALONE, None)``: one is, but it takes no more followers: go upstream uncollapsed.
        """
        flight = self._flights.get(key)
        if flight is None:
            window = max(self.config.follower_lag_bytes, 1)
            flight = Flight(key, ttl=ttl, store=store, max_bytes=max_entry_bytes, window_bytes=window)
            self._flights[key] = flight
            return LEAD, flight
        if flight.accepting and flight.followers < self.config.max_followers:
            flight.followers += 1
            return FOLLOW, flight
        return ALONE, None

    @asynccontextmanager
    async def leading(self, flight: Flight) -> AsyncIterator[Flight]:
        """Hold ``flight`` open while its leader fetches the answer; on the way out, store the answer
        if it completed and may be stored, then let the key go. Followers that join until then get
        the whole answer from the flight."""
        try:
            yield flight
        finally:
            flight.finish(False)  # a no-op when the relay finished it; wakes followers otherwise
            try:
                entry = flight.entry(self.store.clock())
                if entry is not None:
                    with trio.CancelScope(shield=True):  # the client has its answer; storing must not be cut
                        await self._put(flight, entry)
            finally:
                if self._flights.get(flight.key) is flight:
                    del self._flights[flight.key]

    async def _put(self, flight: Flight, entry: CacheEntry) -> None:
        try:
            result = await self.store.put(flight.key, entry)
        except CacheUnavailable:
            return
        flight.stored, flight.evicted = result.stored, result.evicted
        if result.stored:
            log.debug("cache_stored", key=short_key(flight.key), bytes=entry.body_bytes, chunks=len(entry.chunks))


@asynccontextmanager
async def open_cache(config: CacheConfig, redis_url: str = "") -> AsyncIterator[ResponseCache]:
    """The cache with its configured store, open for the duration of the ``async with``;
    ``redis_url`` is the ``[state]`` Redis, used when ``[cache] url`` is empty."""
    if config.backend == "memory":
        yield ResponseCache(config, MemoryStore(config.max_bytes))
        return
    from .redis import RedisStore  # coredis is only imported when Redis is configured

    url = config.url or redis_url
    async with RedisStore(
        url, key_prefix=config.key_prefix, timeout=config.timeout, retry_interval=config.retry_interval
    ) as store:
        yield ResponseCache(config, store)


async def replay(
    entry: CacheEntry | Recording, send: Callable[[bytes], Awaitable[None]], *, paced: bool = False
) -> None:
    """Send a stored answer's chunks, one write each, at once or at the offsets they first came at."""
    start = trio.current_time()
    for chunk, offset in zip(list(entry.chunks), list(entry.offsets)):
        if paced:
            await trio.sleep_until(start + offset)
        await send(chunk)


async def follow(flight: Flight, send: Callable[[bytes], Awaitable[None]]) -> int:
    """Send the answer ``flight`` is fetching as it arrives (head already sent); the bytes sent.
    Raises :class:`LeaderFailed` or :class:`FellBehind` when the answer cannot be completed."""
    number, sent = 0, 0
    while (chunk := await flight.read(number)) is not None:
        await send(chunk)
        number += 1
        sent += len(chunk)
    return sent
