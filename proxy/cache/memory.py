"""The in-process entry store: least recently used first out, bounded by total bytes, with TTL.

Pure: every call takes ``now`` (the caller's monotonic clock), so expiry is tested without waiting.
An expired entry is dropped when it is next looked up, and a few of the least recently used are
checked on every store, so entries nobody asks for again do not sit on the byte budget forever.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .entry import CacheEntry

SWEEP_PER_PUT = 4  # least recently used entries checked for expiry on each store


@dataclass(frozen=True, slots=True)
class Stored:
    """What :meth:`MemoryCache.put` did."""

    stored: bool
    evicted: int = 0  # live entries removed to make room
    expired: int = 0  # expired entries removed on the way


class MemoryCache:
    """Entries by key; ``bytes`` is the sum of their :attr:`CacheEntry.size`, never over ``max_bytes``."""

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self.bytes = 0
        self.evictions = 0  # live entries pushed out by the byte bound, since start
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str, now: float) -> CacheEntry | None:
        """The fresh entry under ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not entry.fresh(now):
            self._remove(key)
            self.expirations += 1
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: CacheEntry, now: float) -> Stored:
        """Store ``entry`` (replacing any under ``key``), evicting the least recently used as needed.
        An entry larger than the whole budget, or already expired, is not stored."""
        expired = self._sweep(now)
        if entry.size > self.max_bytes or not entry.fresh(now):
            return Stored(False, 0, expired)
        if key in self._entries:
            self._remove(key)
        evicted = stale = 0
        while self.bytes + entry.size > self.max_bytes:
            oldest, old = next(iter(self._entries.items()))
            self._remove(oldest)
            if old.fresh(now):
                evicted += 1
            else:
                stale += 1
        self._entries[key] = entry
        self.bytes += entry.size
        self.evictions += evicted
        self.expirations += stale
        return Stored(True, evicted, expired + stale)

    def delete(self, key: str) -> bool:
        if key not in self._entries:
            return False
        self._remove(key)
        return True

    def _remove(self, key: str) -> None:
        self.bytes -= self._entries.pop(key).size

    def _sweep(self, now: float) -> int:
        """Drop expired entries among the few least recently used; returns how many."""
        dropped = 0
        for key in [k for k, _ in zip(self._entries, range(SWEEP_PER_PUT))]:
            if not self._entries[key].fresh(now):
                self._remove(key)
                dropped += 1
        self.expirations += dropped
        return dropped
