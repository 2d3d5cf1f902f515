"""Cache entries in Redis, shared by every Parkway process and machine (coredis on Trio).

One entry is one string value (:func:`~proxy.cache.entry.encode_entry`) under
``<key_prefix><key>``, written with ``SET ... PX <ttl>``: Redis expires it, and its ``maxmemory``
policy (``allkeys-lru`` or ``volatile-lru`` is what operators should set) bounds the total.
``stored_at`` is this machine's wall clock, so ``Age`` is right across processes on machines
whose clocks agree (NTP); Redis's own TTL is what decides expiry.

When Redis fails, the cache steps aside: the operation raises
:class:`~proxy.cache.flight.CacheUnavailable`, the request is served from the upstream, one
``cache_unavailable`` log line marks the start of the outage and ``cache_recovered`` its end.
While Redis is down, one operation per ``retry_interval`` tries it; the rest bypass at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import coredis
import structlog
import trio

from .._redis import REDIS_FAILURES, RedisClientOwner
from ..limits import Outage
from .entry import CacheEntry, CorruptEntry, decode_entry, encode_entry
from .memory import Stored
from .policy import CacheUnavailable, short_key

log = structlog.get_logger("parkway.cache")
T = TypeVar("T")


class RedisStore(RedisClientOwner):
    """The :class:`~proxy.cache.flight.CacheStore` over Redis; ``async with RedisStore(url) as store``."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "parkway:cache:",
        timeout: float = 0.25,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ):
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.outage = Outage(retry_interval)
        self.failures = 0  # operations that found Redis unusable (for the metric)
        self._clock = clock
        super().__init__(url, timeout=timeout)
        self._bytes = 0  # bytes this process wrote (the gauge; Redis's INFO has the whole truth)
        self._entries = 0

    @property
    def client(self) -> coredis.Redis[bytes]:
        """The store's own client, for the shared recordings of :mod:`proxy.cache.shared`."""
        return self._client

    def clock(self) -> float:
        return self._clock()

    def healthy(self) -> bool:
        return not self.outage.down

    def stats(self) -> tuple[int, int]:
        return self._bytes, self._entries

    async def get(self, key: str) -> CacheEntry | None:
        data = await self.call(lambda: self._client.get(self.key_prefix + key))
        if data is None:
            return None
        try:
            entry = decode_entry(data)
        except CorruptEntry as exc:
            # Another version's format, or a value someone else wrote: a miss, never a crash.
            log.warning("cache_entry_unreadable", key=short_key(key), error=str(exc))
            return None
        return entry if entry.fresh(self._clock()) else None

    async def put(self, key: str, entry: CacheEntry) -> Stored:
        ttl_ms = math.ceil(entry.remaining(self._clock()) * 1000)
        if ttl_ms <= 0:
            return Stored(False)
        data = encode_entry(entry)
        await self.call(lambda: self._client.set(self.key_prefix + key, data, px=ttl_ms))
        self._bytes += len(data)
        self._entries += 1
        return Stored(True)

    async def call(self, operation: Callable[[], Awaitable[T]], *, timeout: float | None = None) -> T:
        """One Redis operation within ``timeout`` (default: the store's); :class:`CacheUnavailable`
        when Redis fails."""
        if not self.outage.claim_attempt(trio.current_time()):
            self.failures += 1
            raise CacheUnavailable("Redis is unreachable (waiting to try again)")
        try:
            with trio.fail_after(self.timeout if timeout is None else timeout):
                result = await operation()
        except REDIS_FAILURES as exc:
            self.failures += 1
            if self.outage.failed(trio.current_time()):
                log.error(
                    "cache_unavailable",
                    backend="redis",
                    redis=self._location,
                    error=str(exc) or type(exc).__name__,
                    retry_interval=self.retry_interval,
                )
            raise CacheUnavailable(str(exc) or type(exc).__name__) from exc
        length = self.outage.succeeded(trio.current_time())
        if length is not None:
            log.warning("cache_recovered", backend="redis", redis=self._location, outage_s=round(length, 3))
        return result
