"""The response cache's Trio side: single flight, the shared recording, replay of an entry.

Decisions live in :mod:`proxy.cache.policy` (may this request use the cache, the key, may this
answer be stored) and :mod:`proxy.cache.entry`; entries live in a store: :class:`MemoryStore`
here, or :class:`~proxy.cache.redis.RedisStore` shared by several processes.

Single flight: the first request for a key that is not stored starts a :class:`Flight`. Its
*fetch* runs as a task of the cache (:meth:`ResponseCache.start`), not of any client: it reads
the upstream at the upstream's pace into the flight's :class:`~proxy.cache.entry.Recording`
(every chunk while the answer may still be stored, at most ``max_entry_bytes``; past that a
window of ``follower_lag_bytes``). Every client of the flight, the one whose request started
it included, is a *reader* that sends the recording at its own pace (:func:`follow`): a client
that stops reading is cut alone by its own ``client_write_timeout``, and nobody waits for it.
The fetch goes on while any reader remains, and is cancelled when the last one leaves.

Only a lone reader paces the fetch, once the answer is past what is kept whole: then there is
nobody else to delay and it is better to slow the upstream than to cut that client. With several
readers of such an answer, one that falls ``follower_lag_bytes`` behind is cut loose
(:class:`FellBehind`). A fetch that fails before the upstream's head hands its error to the
client that started it and leaves the other readers free to try again; one that fails
mid-answer makes every reader fail the same way (:class:`LeaderFailed`), never a truncated
answer passed off as complete.
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


class SharedRunner(Protocol):
    async def run(
        self,
        flight: Flight,
        fetch: Callable[[Flight], Awaitable[None]],
        store: Callable[[Flight], Awaitable[None]],
    ) -> None:
        """Feed ``flight`` by ``fetch`` (then ``store`` it) or from another process's recording."""


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


class Reader:
    """Where one client is in the recording: the next chunk's number and the body bytes taken."""

    __slots__ = ("number", "taken")

    def __init__(self) -> None:
        self.number = 0
        self.taken = 0


class Flight:
    """One upstream call that identical requests share. Its fetch calls :meth:`begin` with the
    upstream's head, then :meth:`room` and :meth:`feed` per chunk, and :meth:`finish`."""

    __slots__ = (
        "_head",
        "_lot",
        "_positions",
        "_room",
        "accepting",
        "complete",
        "detail",
        "done",
        "error",
        "evicted",
        "head_at",
        "key",
        "max_bytes",
        "put_done",
        "readers",
        "recording",
        "refresh",
        "remote",
        "scope",
        "settled",
        "shared",
        "store",
        "stored",
        "ttl",
        "usage",
        "usage_detail",
        "window_bytes",
    )  # fmt: skip

    def __init__(self, key: str, *, ttl: float, store: bool, max_bytes: int, window_bytes: int):
        self.key, self.ttl, self.store = key, ttl, store
        self.max_bytes, self.window_bytes = max_bytes, window_bytes
        self.recording: Recording | None = None
        self.shared = False  # followers may receive this answer
        self.accepting = True  # new followers may join
        self.readers = 1  # clients reading (or about to), the one that started the flight included
        self.remote = False  # fed by another process's recording (collapsing through Redis)
        self.refresh = False  # started by a client's no-cache: a stored answer must not feed it
        self.done = False
        self.complete = False
        self.stored = False
        self.error: BaseException | None = None  # why the fetch failed (before the head or after)
        self.detail: str | None = None  # why the answer will not be stored (Cache-Status detail)
        self.settled = trio.Event()  # the fetch is over and the answer stored (or not)
        self.put_done = False  # the answer was offered to the store (once)
        self.head_at = 0.0
        self.evicted = 0  # entries the store pushed out to make room for this one
        self.usage: tuple[int, int] = (0, 0)  # prompt, completion tokens of the answer
        self.usage_detail: object = None  # the fetch's parsed usage, for the starting request's log line
        self.scope: trio.CancelScope | None = None  # the fetch's: cancelled when the last reader leaves
        self._positions: list[Reader] = []
        self._head = trio.Event()
        self._lot = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()

    @property
    def followers(self) -> int:
        return self.readers - 1

    @property
    def head_ready(self) -> trio.Event:
        """Set once the head arrived or the fetch ended without one."""
        return self._head

    async def changed(self) -> None:
        """Wait for the next chunk or the end (for a reader that does not count as a client)."""
        if not self.done:
            await self._lot.park()

    # --- the fetch ----------------------------------------------------------------------------------

    def begin(self, status: int, headers: tuple[Header, ...], *, share: bool) -> None:
        """The upstream's head arrived. ``share``: the answer may be stored, so followers may have it
        too (an error or a ``private`` answer is not shared: each follower then goes upstream itself)."""
        self.head_at = trio.current_time()
        self.recording = Recording(
            status, headers, started=self.head_at, max_bytes=self.max_bytes, window_bytes=self.window_bytes
        )
        self.shared = share
        self.store = self.store and share
        self.accepting = self.accepting and share
        self._head.set()

    async def room(self, size: int) -> None:
        """Wait until a chunk of ``size`` bytes may be added. Only past what is kept whole, and only
        for a lone reader: adding would drop bytes it has not sent yet. Otherwise at once."""
        recording = self.recording
        if recording is None or recording.keeping:
            return
        while self.readers == 1 and not self.done:
            reader = self._positions[0] if len(self._positions) == 1 else None
            unread = recording.size - (reader.taken if reader is not None else 0)
            if unread == 0 or unread + size <= self.window_bytes:
                return
            await self._room.park()

    def feed(self, data: bytes) -> None:
        recording = self.recording
        if recording is None or not data:
            return
        # bytes() keeps a bytes object as it is, and copies a view of a buffer the caller may reuse.
        recording.add(bytes(data), trio.current_time())
        if not recording.keeping:
            self.accepting = False  # a late follower would need chunks no longer held
        self._lot.unpark_all()

    def fail(self, error: BaseException) -> None:
        """The fetch failed: before the head, the starting client is answered ``error``; after it,
        every reader is cut (and the starting client's log line says why)."""
        if self.error is None:
            self.error = error

    def finish(self, complete: bool) -> None:
        """``complete``: the upstream's end of body arrived."""
        if self.done:
            return
        self.done = True
        self.complete = complete and self.recording is not None
        keeping = self.recording is not None and self.recording.keeping
        self.accepting = self.accepting and self.complete and keeping
        self._head.set()
        self._lot.unpark_all()
        self._room.unpark_all()

    def entry(self, stored_at: float) -> CacheEntry | None:
        """The answer to store, if it may be stored: complete, storable, within max_entry_bytes."""
        recording = self.recording
        if not (self.complete and self.store and recording is not None and recording.keeping):
            return None
        prompt, completion = self.usage
        return recording.entry(stored_at=stored_at, ttl=self.ttl, prompt_tokens=prompt, completion_tokens=completion)

    # --- readers ------------------------------------------------------------------------------------

    def leave(self) -> None:
        """A reader is done (or gone). The last one leaving stops a fetch nobody reads any more."""
        self.readers -= 1
        self._room.unpark_all()
        if self.readers <= 0 and not self.done and self.scope is not None:
            self.scope.cancel()

    async def head(self) -> Recording:
        """The upstream's head, for the client that started the flight: raises the fetch's error
        when it failed before the head."""
        await self._head.wait()
        if self.recording is None:
            if self.error is not None:
                raise self.error
            raise LeaderFailed("the upstream call was stopped before its answer")
        return self.recording

    async def wait_head(self) -> Recording | None:
        """The answer to follow, or None: the fetch failed before its head, or its answer is not one
        to share. Either way the follower makes its own attempt."""
        await self._head.wait()
        return self.recording if self.shared else None

    def reader(self) -> Reader:
        reader = Reader()
        self._positions.append(reader)
        return reader

    def unread(self, reader: Reader) -> None:
        if reader in self._positions:
            self._positions.remove(reader)
        self._room.unpark_all()

    async def read(self, number: int | Reader) -> bytes | None:
        """The reader's next chunk (or chunk ``number``) once it has arrived; None after the last one
        of a complete answer. Raises :class:`LeaderFailed` or :class:`FellBehind`."""
        reader = number if isinstance(number, Reader) else None
        index = reader.number if reader is not None else number
        assert isinstance(index, int)
        recording = self.recording
        assert recording is not None, "wait_head() first"
        while index >= recording.end:
            if self.done:
                if self.complete:
                    return None
                raise LeaderFailed("the upstream call this answer came from failed mid-answer")
            await self._lot.park()
        chunk = recording.get(index)
        if chunk is None:
            raise FellBehind("fell too far behind the other clients of an answer too big to keep")
        if reader is not None:
            reader.number += 1
            reader.taken += len(chunk)
            if self._room:
                self._room.unpark_all()
        return chunk


class ResponseCache:
    """Lookups, single flight and storing, over one :class:`CacheStore`. Fetches run in ``nursery``
    (the app's, through :func:`open_cache`), so no client's task owns an upstream call others read."""

    def __init__(
        self,
        config: CacheConfig,
        store: CacheStore,
        nursery: trio.Nursery | None = None,
        shared: SharedRunner | None = None,
    ):
        self.config = config
        self.store = store
        self.nursery = nursery
        self.shared = shared  # collapsing across processes (Redis), or None: within this process
        self._flights: dict[str, Flight] = {}

    @property
    def flights(self) -> int:
        return len(self._flights)

    async def lookup(self, key: str) -> CacheEntry | None:
        """The stored answer, or None; raises :class:`CacheUnavailable` (the caller goes upstream)."""
        return await self.store.get(key)

    def join_nowait(
        self, key: str, *, ttl: float, store: bool, max_entry_bytes: int, refresh: bool = False
    ) -> tuple[str, Flight | None]:
        """Decide, without waiting, how a request for ``key`` goes:

        * ``(LEAD, flight)``: no identical call is in flight; this request starts it. The flight is
          registered at once (so the next identical request follows it); the caller starts its
          fetch with :meth:`start` and reads it like any follower.
        * ``(FOLLOW, flight)``: an identical call is in flight and takes followers.
        * ``(ALONE, None)``: one is, but it takes no more followers: go upstream uncollapsed. So does
          a ``refresh`` (the client's ``no-cache``) once that call's answer has begun: it would not
          be an answer produced after this request.

        Every LEAD or FOLLOW is a reader of the flight and must call :meth:`Flight.leave` once done.
        """
        flight = self._flights.get(key)
        if flight is None:
            window = max(self.config.follower_lag_bytes, 1)
            flight = Flight(key, ttl=ttl, store=store, max_bytes=max_entry_bytes, window_bytes=window)
            self._flights[key] = flight
            return LEAD, flight
        if refresh and flight.recording is not None:
            return ALONE, None
        if flight.accepting and flight.followers < self.config.max_followers:
            flight.readers += 1
            return FOLLOW, flight
        return ALONE, None

    def abandon(self, flight: Flight) -> None:
        """The request that was to start ``flight`` never did (refused at admission): its followers
        make their own attempt, and the key is free again."""
        flight.finish(False)
        flight.settled.set()
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    def start(self, flight: Flight, fetch: Callable[[Flight], Awaitable[None]]) -> None:
        """Run ``fetch`` (the upstream call feeding ``flight``) as the cache's own task."""
        if self.nursery is None:
            raise RuntimeError("the cache was opened without a nursery: use open_cache()")
        flight.scope = trio.CancelScope()  # leave() may cancel it before the task runs
        self.nursery.start_soon(self._fetch, flight, fetch)

    async def _fetch(self, flight: Flight, fetch: Callable[[Flight], Awaitable[None]]) -> None:
        assert flight.scope is not None
        with flight.scope:
            try:
                async with self.leading(flight):
                    if self.shared is None:
                        await fetch(flight)
                    else:
                        await self.shared.run(flight, fetch, self.store_flight)
            except Exception as exc:  # the starting client's task raises it; nobody else must see it
                flight.fail(exc)
            finally:
                flight.settled.set()

    @asynccontextmanager
    async def leading(self, flight: Flight) -> AsyncIterator[Flight]:
        """Hold ``flight`` open while its fetch reads the answer; on the way out, store the answer
        if it completed and may be stored, then let the key go. Followers that join until then get
        the whole answer from the flight."""
        try:
            yield flight
        finally:
            flight.finish(False)  # a no-op when the fetch finished it; wakes readers otherwise
            try:
                await self.store_flight(flight)
            finally:
                if self._flights.get(flight.key) is flight:
                    del self._flights[flight.key]

    async def store_flight(self, flight: Flight) -> None:
        """Store the flight's answer if it completed and may be stored; once."""
        if flight.put_done:
            return
        flight.put_done = True
        entry = flight.entry(self.store.clock())
        if entry is not None:
            with trio.CancelScope(shield=True):  # the answer is whole; storing must not be cut
                await self._put(flight, entry)

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
    ``redis_url`` is the ``[state]`` Redis, used when ``[cache] url`` is empty. Fetches still
    running when it closes are cancelled."""
    if config.backend == "memory":
        async with trio.open_nursery() as nursery:
            yield ResponseCache(config, MemoryStore(config.max_bytes), nursery)
            nursery.cancel_scope.cancel()
        return
    from .redis import RedisStore  # coredis is only imported when Redis is configured
    from .shared import SharedFlights

    url = config.url or redis_url
    async with RedisStore(
        url, key_prefix=config.key_prefix, timeout=config.timeout, retry_interval=config.retry_interval
    ) as store:
        async with SharedFlights(store, config, url) as shared, trio.open_nursery() as nursery:
            yield ResponseCache(config, store, nursery, shared)
            nursery.cancel_scope.cancel()


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
    """Send the answer ``flight`` is fetching, as it arrives and at this client's pace (head already
    sent); the bytes sent. Raises :class:`LeaderFailed` or :class:`FellBehind` when the answer
    cannot be completed."""
    reader = flight.reader()
    sent = 0
    try:
        while (chunk := await flight.read(reader)) is not None:
            await send(chunk)
            sent += len(chunk)
    finally:
        flight.unread(reader)
    return sent
