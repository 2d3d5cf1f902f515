"""proxy.cache.memory: the LRU entry store bounded by bytes, with TTL. Pure: time is an argument."""

from __future__ import annotations

import pytest

from proxy.cache.entry import CacheEntry
from proxy.cache.memory import MemoryCache, Stored


def entry(body: bytes = b"x" * 100, *, stored_at: float = 0.0, ttl: float = 60.0) -> CacheEntry:
    return CacheEntry(200, (), (body,), (0.0,), stored_at, ttl)


SIZE = entry().size


def test_get_put_and_ttl() -> None:
    cache = MemoryCache(10 * SIZE)
    assert cache.get("k", 0.0) is None
    assert cache.put("k", entry(), 0.0) == Stored(True)
    assert cache.get("k", 59.9) == entry()
    assert cache.get("k", 60.0) is None  # expired exactly at stored_at + ttl
    assert "k" not in cache and cache.bytes == 0 and cache.expirations == 1


def test_lru_eviction_by_bytes() -> None:
    cache = MemoryCache(3 * SIZE)
    for key in "abc":
        cache.put(key, entry(), 0.0)
    assert cache.get("a", 1.0) is not None  # a is now the most recently used
    assert cache.put("d", entry(), 1.0) == Stored(True, evicted=1)
    assert "b" not in cache and all(k in cache for k in "acd")
    assert cache.bytes == 3 * SIZE and cache.evictions == 1


def test_a_big_entry_evicts_several() -> None:
    cache = MemoryCache(4 * SIZE)
    for key in "abcd":
        cache.put(key, entry(), 0.0)
    big = entry(b"y" * (2 * SIZE))
    result = cache.put("big", big, 0.0)
    assert result.stored and result.evicted == 3 and [k for k in "abcd" if k in cache] == ["d"]
    assert cache.bytes <= cache.max_bytes


def test_an_entry_over_the_whole_budget_is_not_stored() -> None:
    cache = MemoryCache(SIZE)
    cache.put("a", entry(), 0.0)
    assert cache.put("huge", entry(b"z" * SIZE), 0.0) == Stored(False)
    assert "a" in cache  # nothing was evicted for it


def test_an_expired_entry_is_not_stored() -> None:
    cache = MemoryCache(10 * SIZE)
    assert not cache.put("k", entry(stored_at=0.0, ttl=5.0), 5.0).stored


def test_replacing_a_key_keeps_the_byte_count() -> None:
    cache = MemoryCache(10 * SIZE)
    cache.put("k", entry(), 0.0)
    cache.put("k", entry(b"y" * 300), 0.0)
    assert len(cache) == 1 and cache.bytes == entry(b"y" * 300).size
    assert cache.get("k", 0.0).body == b"y" * 300  # type: ignore[union-attr]


def test_expired_entries_go_before_live_ones_and_are_not_evictions() -> None:
    cache = MemoryCache(3 * SIZE)
    cache.put("short", entry(ttl=1.0), 0.0)
    cache.put("a", entry(), 0.0)
    cache.put("b", entry(), 0.0)
    result = cache.put("c", entry(stored_at=2.0), 2.0)
    assert result == Stored(True, evicted=0, expired=1)
    assert cache.evictions == 0 and cache.expirations == 1


def test_sweep_frees_expired_bytes_nobody_asks_for() -> None:
    cache = MemoryCache(100 * SIZE)
    for i in range(4):
        cache.put(f"old{i}", entry(ttl=1.0), 0.0)
    cache.put("new", entry(stored_at=5.0), 5.0)
    assert len(cache) == 1 and cache.bytes == SIZE


def test_delete() -> None:
    cache = MemoryCache(10 * SIZE)
    cache.put("k", entry(), 0.0)
    assert cache.delete("k") and not cache.delete("k") and cache.bytes == 0


def test_max_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MemoryCache(0)
