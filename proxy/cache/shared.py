"""Collapsing across processes: a flight's recording shared through Redis (coredis on Trio).

Within a process, identical requests already share one :class:`~proxy.cache.flight.Flight`; this
module decides, per flight, which process makes the upstream call and carries its answer to the
others as it arrives, so N identical requests on any number of processes cost one upstream call.

* **Who leads.** ``SET <key>:lock <generation> NX PX lock_timeout``, the generation fresh from
  ``INCR <prefix>generation``: a fencing token, so a leader that lost its lock (paused, then
  replaced) can no longer write.
* **The leader** runs the upstream call as usual and, on the side, appends the recording to the
  stream ``<key>:rec:<generation>`` in batches (every ~20 ms, or 4 KiB): the head, batches of
  chunks, and an end record (complete with its token usage, failed mid-answer, or failed before
  its head). Each append is one Lua script that checks the generation, renews the lock, and on
  the last batch releases it; while the upstream says nothing the lock is renewed alone.
  Recording stops at ``max_entry_bytes``: past it the end record says "failed", never a
  truncated answer passed off as complete.
* **A follower process** reads the stream from its start with ``XREAD BLOCK``, so a late joiner
  replays what it missed and then follows live, and feeds its local flight: its clients are fed
  as if the call were local. One blocked read per flight per process, whatever its number of
  clients (50 clients on one process need one connection), on a dedicated pool of
  ``stream_readers`` connections; when they are all busy a flight polls instead.
* **A leader that dies** (its lock expires without an end record): a follower that has fed
  nothing to its clients yet claims the lock and becomes the new leader; one already streaming
  ends its clients' answers cut (closed before the end, as when an upstream fails).
* **Redis unreachable**: the flight runs locally, collapsed within this process only.

Waiting is bounded: a follower waits while the leader's lock lives (renewed at least every
``lock_timeout / 3``), so a dead leader is noticed within about ``lock_timeout``, a live leader's
call is bounded by its own upstream timeouts, and leadership is tried at most three times before a
process makes the call itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

import structlog
import trio
from coredis.tokens import PureToken

from .._redis import RedisClientOwner
from .entry import (
    COMPLETE,
    FAILED,
    NOT_STARTED,
    CorruptEntry,
    End,
    Head,
    Header,
    Recording,
    decode_record,
    encode_data,
    encode_end,
    encode_head,
)
from .policy import CacheConfig, CacheUnavailable, NotShared, short_key
from .redis import RedisStore

log = structlog.get_logger("parkway.cache")

BATCH_SECONDS = 0.02  # a batch waits this long for more chunks ...
BATCH_BYTES = 4096  # ... unless this many bytes are there
MAX_APPEND_BYTES = 256 * 1024  # at most this much body per script call (a fast upstream is split)
STREAM_TTL_MS = 60_000  # a recording outlives its last append by this (late joiners replay it)
ATTEMPTS = 3  # leaders that fail before their head, at most, before this process calls itself
POLL_SECONDS = 0.05  # the wait between reads of a flight that found no free reading connection

# KEYS: lock, stream. ARGV: generation, lock ms, stream ms, "1" to release the lock, records...
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 5, #ARGV do redis.call('XADD', KEYS[2], '*', 'r', ARGV[i]) end
if #ARGV >= 5 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
if ARGV[4] == '1' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


class Flight(Protocol):
    """What this module uses of a :class:`~proxy.cache.flight.Flight` (which imports this module)."""

    key: str
    store: bool
    remote: bool
    readers: int
    recording: Recording | None
    shared: bool
    done: bool
    complete: bool
    usage: tuple[int, int]
    refresh: bool

    @property
    def head_ready(self) -> trio.Event: ...

    def begin(self, status: int, headers: tuple[Header, ...], *, share: bool) -> None: ...

    def feed(self, data: bytes) -> None: ...

    def fail(self, error: BaseException) -> None: ...

    def finish(self, complete: bool) -> None: ...

    def leave(self) -> None: ...

    async def changed(self) -> None: ...


Fetch = Callable[[Any], Awaitable[None]]


class SharedFlights(RedisClientOwner):
    """Leads or follows each flight across processes; ``async with SharedFlights(store, config)``."""

    def __init__(self, store: RedisStore, config: CacheConfig, url: str):
        self.store = store
        self.prefix = config.key_prefix
        self.lock_ms = max(100, int(config.lock_timeout * 1000))
        self.block_ms = max(50, self.lock_ms // 2)
        self.heartbeat = config.lock_timeout / 3
        self.readers = trio.Semaphore(config.stream_readers)
        # Its own client is for blocked reads, which hold their connection: a pool of their own,
        # so they never starve the store's short operations (those use the store's client).
        super().__init__(url, timeout=config.timeout, max_connections=config.stream_readers)
        self._append = store.client.register_script(APPEND)
        self._unlock = store.client.register_script(RELEASE)

    # --- one flight ---------------------------------------------------------------------------------

    async def run(self, flight: Flight, fetch: Fetch, store_answer: Fetch) -> None:
        """Feed ``flight``: by leading (``fetch``, the upstream call, published for the others, then
        ``store_answer`` before the lock is let go) or by following another process's recording."""
        store = flight.store
        for _ in range(ATTEMPTS):
            try:
                generation = await self._claim(flight.key)
            except CacheUnavailable:
                break  # Redis is not there: collapsed within this process only
            if generation > 0:
                try:
                    if not await self._stored_meanwhile(flight):
                        await self._lead(flight, fetch, store_answer, generation)
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(self.store.timeout):
                        try:
                            await self._release(flight.key, generation)
                        except CacheUnavailable:
                            pass  # it expires by itself
                return
            if flight.refresh:
                break  # the client's no-cache: never an answer another process began before it
            flight.remote, flight.store = True, False
            try:
                if await self._follow(flight, -generation):
                    return
            except CacheUnavailable:
                if flight.recording is not None:
                    flight.finish(False)
                    return
                break
            flight.remote, flight.store = False, store  # the leader died before anything began
        flight.remote, flight.store = False, store
        await fetch(flight)

    async def _claim(self, key: str) -> int:
        """A positive generation: this process leads. Negative: the generation of the leader to follow."""
        client, lock = self.store.client, self._lock(key)
        for _ in range(ATTEMPTS):
            generation = await self.store.call(lambda: client.incr(self.prefix + "generation"))
            taken = await self.store.call(partial(client.set, lock, str(generation), condition=PureToken.NX,
                                                  px=self.lock_ms))  # fmt: skip
            if taken:
                return int(generation)
            current = await self.store.call(lambda: client.get(lock))
            if current is not None and current.isdigit():
                return -int(current)
        raise CacheUnavailable("the collapsing lock changed hands on every attempt")

    async def _stored_meanwhile(self, flight: Flight) -> bool:
        """The answer another process stored between this one's lookup and its claim: fed from the
        entry, with no upstream call. Not for a refresh (the client's ``no-cache``)."""
        if flight.refresh:
            return False
        try:
            entry = await self.store.get(flight.key)
        except CacheUnavailable:
            return False
        if entry is None:
            return False
        flight.remote, flight.store = True, False
        flight.begin(entry.status, entry.headers, share=True)
        for chunk in entry.chunks:
            flight.feed(chunk)
        flight.usage = (entry.prompt_tokens, entry.completion_tokens)
        flight.finish(True)
        return True

    async def _lead(self, flight: Flight, fetch: Fetch, store_answer: Fetch, generation: int) -> None:
        flight.readers += 1  # the publisher reads too: followers elsewhere may need the whole answer
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._publish, flight, generation)
                try:
                    await fetch(flight)
                finally:
                    flight.finish(False)  # a no-op after a complete answer; ends the publisher otherwise
            # Stored before the lock goes: a process that claims it next finds the entry.
            await store_answer(flight)
        finally:
            flight.leave()

    async def _release(self, key: str, generation: int) -> None:
        await self.store.call(lambda: self._unlock(keys=[self._lock(key)], args=[str(generation)]))

    # --- the leader's side --------------------------------------------------------------------------

    async def _publish(self, flight: Flight, generation: int) -> None:
        """Append the flight's recording to the stream as it grows; an end record whatever happens."""
        lock, stream = self._lock(flight.key), self._stream(flight.key, generation)
        ended = False

        async def append(records: list[bytes], *, last: bool = False) -> bool:
            args = [str(generation), str(self.lock_ms), str(STREAM_TTL_MS), "1" if last else "0", *records]
            return bool(await self.store.call(lambda: self._append(keys=[lock, stream], args=args)))

        try:
            while not flight.head_ready.is_set():  # the upstream has not answered yet: keep the lock
                with trio.move_on_after(self.heartbeat):
                    await flight.head_ready.wait()
                if not flight.head_ready.is_set() and not await append([]):
                    return
            recording = flight.recording
            if recording is None:
                ended = await append([encode_end(End(NOT_STARTED))], last=True)
                return
            head = encode_head(Head(recording.status, recording.headers, flight.shared))
            if not flight.shared:  # each follower makes its own call: they need no body
                ended = await append([head, encode_end(End(NOT_STARTED, reason="not shared"))], last=True)
                return
            pending, number, published, last_flush = [head], 0, 0, trio.current_time()
            while True:
                while number >= recording.end and not flight.done and not pending:
                    with trio.move_on_after(self.heartbeat) as idle:
                        await flight.changed()
                    if idle.cancelled_caught and not await append([]):
                        return
                if not flight.done and recording.size - published < BATCH_BYTES:
                    with trio.move_on_after(max(0.0, last_flush + BATCH_SECONDS - trio.current_time())):
                        while not flight.done and recording.size - published < BATCH_BYTES:
                            await flight.changed()
                if not recording.keeping:  # over max_entry_bytes: followers elsewhere are cut, cleanly
                    reason = "over max_entry_bytes"
                    ended = await append([*pending, encode_end(End(FAILED, reason=reason))], last=True)
                    return
                chunks, size = [], 0
                while number < recording.end and size < MAX_APPEND_BYTES:  # one script call stays small
                    chunk = recording.chunks[number - recording.base]
                    chunks.append(chunk)
                    size += len(chunk)
                    number += 1
                if chunks:
                    published += size
                    pending.append(encode_data(chunks))
                last = flight.done and number >= recording.end
                if last:
                    outcome = COMPLETE if flight.complete else FAILED
                    pending.append(encode_end(End(outcome, *flight.usage)))
                if not await append(pending):  # the lock is let go once the answer is stored
                    log.warning("cache_lock_lost", key=short_key(flight.key), generation=generation)
                    return
                pending, last_flush = [], trio.current_time()
                if last:
                    ended = True
                    return
        except CacheUnavailable:
            return  # followers elsewhere see the lock expire
        finally:
            if not ended:
                with trio.CancelScope(shield=True), trio.move_on_after(self.store.timeout):
                    try:
                        await append([encode_end(End(FAILED if flight.recording else NOT_STARTED))], last=True)
                    except CacheUnavailable:
                        pass

    # --- a follower's side --------------------------------------------------------------------------

    async def _follow(self, flight: Flight, generation: int) -> bool:
        """Feed ``flight`` from the leader's stream; False when the leader ended before anything was
        fed (this process may then lead)."""
        lock, stream = self._lock(flight.key), self._stream(flight.key, generation)
        last = b"0-0"
        while True:
            records = await self._read(stream, last, block=True)
            if not records:
                current = await self.store.call(lambda: self.store.client.get(lock))
                if current == str(generation).encode():
                    continue  # the leader lives; its answer is slow
                records = await self._read(stream, last, block=False)  # its last append may have raced
                if not records:
                    log.warning("cache_leader_lost", key=short_key(flight.key), generation=generation)
                    if flight.recording is None:
                        return False
                    flight.finish(False)  # clients already streaming are cut, never handed a short answer
                    return True
            for identifier, value in records:
                last = identifier
                try:
                    record = decode_record(value)
                except CorruptEntry as exc:
                    log.warning("cache_record_unreadable", key=short_key(flight.key), error=str(exc))
                    if flight.recording is None:
                        return False
                    flight.finish(False)
                    return True
                if isinstance(record, Head):
                    if not record.shared:
                        flight.fail(NotShared("the answer is not one to share"))
                        return True
                    flight.begin(record.status, record.headers, share=True)
                elif isinstance(record, End):
                    if record.outcome == COMPLETE and flight.recording is not None:
                        flight.usage = (record.prompt_tokens, record.completion_tokens)
                        flight.finish(True)
                        return True
                    if flight.recording is None:
                        return False
                    flight.finish(False)
                    return True
                else:
                    for chunk in record:
                        flight.feed(chunk)

    async def _read(self, stream: str, last: bytes, *, block: bool) -> list[tuple[bytes, bytes]]:
        """New records of ``stream`` after ``last``: blocking up to half the lock timeout on a reading
        connection when one is free, else one quick look (and a short pause when there is nothing)."""
        if block and self._try_reader():
            try:
                result = await self.store.call(
                    lambda: self._client.xread({stream: last}, count=64, block=self.block_ms),
                    timeout=self.block_ms / 1000 + self.store.timeout,
                )
            finally:
                self.readers.release()
        else:
            result = await self.store.call(lambda: self.store.client.xread({stream: last}, count=64))
            if block and not result:
                await trio.sleep(POLL_SECONDS)
        if not result:
            return []
        entries: Any = next(iter(result.values()), ())
        return [(bytes(e.identifier), bytes(e.field_values.get(b"r", b""))) for e in entries]

    def _try_reader(self) -> bool:
        try:
            self.readers.acquire_nowait()
        except trio.WouldBlock:
            return False
        return True

    def _lock(self, key: str) -> str:
        return f"{self.prefix}{key}:lock"

    def _stream(self, key: str, generation: int) -> str:
        return f"{self.prefix}{key}:rec:{generation}"
