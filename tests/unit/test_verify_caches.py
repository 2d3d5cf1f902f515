"""The caches of signature verification keep nothing of a query too long to keep.

Any client can send a signed-URL query (a credential id is public: it is in every URL the
browser sees), and verifying it encodes each of its values three ways. Cached without a bound on
size, 1,500 refused requests with a 12 KB parameter each kept 330 MB; the caches of
proxy.verify and proxy.signing now keep the texts of queries up to MAX_CACHED_QUERY characters
only, and what those can keep is a few MB in all.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import _lru_cache_wrapper
from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import query, signing, urls, verify
from proxy.errors import BadRequest, Forbidden, ParkwayError
from proxy.query import MAX_CACHED_QUERY, parse_query
from proxy.signing import PAIR_ENCODINGS, UNCACHED_PAIRS, sign_url
from proxy.verify import parse_signed_request, verify_signature

SECRET = "s3cret-for-tests"
PROXY = "https://api.example.com/v1/chat/completions"


# Keyed by a configured secret and an 8-digit day: a few bytes each, whatever the query.
FIXED_SIZE = {"signing_key", "_keyed_hmac"}


def caches() -> list[_lru_cache_wrapper[object]]:
    """Every cache of Parkway's that verifying a query can fill with the query's texts."""
    found = [
        f
        for module in (signing, verify, query)
        for f in vars(module).values()
        if isinstance(f, _lru_cache_wrapper) and f.__module__ == module.__name__ and f.__name__ not in FIXED_SIZE
    ]
    assert len(found) >= 10  # the encodings, their pairs, the fields, the decoded texts, ...
    return [*found, urls.normalize_url]


def sizes() -> list[int]:
    return [f.cache_info().currsize for f in caches()]


def signed_query(extra: str, *, now: datetime | None = None) -> str:
    url = sign_url(
        id="c1",
        secret=SECRET,
        host="http://parkway.test/",
        proxy_url=PROXY,
        expiry=600,
        method="POST",
        datetime_override=now or datetime.now(UTC),
        params={"user": extra},
    )
    return urlsplit(url).query


def check(query: str) -> None:
    req = parse_signed_request(query)
    verify_signature(req, method="POST", secrets=[SECRET], paths=["/"], headers={}, body=None)


def refused(queries: Iterator[str]) -> int:
    """Verify each query, all refused: the bytes still allocated afterwards."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for query in queries:
            with pytest.raises(ParkwayError):
                check(query)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def forged(count: int, value: Callable[[int], str]) -> Iterator[str]:
    """Queries as any client can write them: a valid shape, a wrong signature, a new value each."""
    good = signed_query("x")
    head, _, _ = good.rpartition("&X-Sw-Signature=")
    for i in range(count):
        yield f"{head}&user={value(i)}&X-Sw-Signature={'0' * 64}"


def clear() -> None:
    for f in caches():
        f.cache_clear()


def test_a_long_query_verifies_without_filling_any_cache():
    long_value = "é " * MAX_CACHED_QUERY  # decoded and encoded, not cached
    query = signed_query(long_value)
    assert len(query) > MAX_CACHED_QUERY
    clear()
    check(query)  # the uncached path gives the same canonical request as the signer
    assert parse_signed_request(query).extras["user"] == long_value
    assert sum(sizes()) == 0
    tampered = query.replace("%C3%A9", "%C3%A8", 1)
    with pytest.raises(Forbidden):
        check(tampered)
    assert sum(sizes()) == 0
    assert dict(parse_query(query))["user"] == long_value
    assert sum(sizes()) == 0
    # A short one is cached, as before.
    short = signed_query("short")
    clear()
    check(short)
    assert sum(sizes()) > 0


def test_refused_long_queries_keep_nothing():
    kept = refused(forged(300, lambda i: f"{i:06d}" + "*" * 12_000))
    assert kept < 1 << 20, f"{kept / 1e6:.1f} MB kept by 300 refused requests"


@pytest.mark.parametrize("unit", ["*", "%2A", "%F0%9F%98%80"])
def test_refused_queries_just_under_the_bound_keep_a_few_mb_at_most(unit: str):
    room = MAX_CACHED_QUERY - len(next(forged(1, lambda i: ""))) - 8
    repeat = room // len(unit)
    clear()
    # More than any cache holds, so each is full at the end.
    kept = refused(forged(1_500, lambda i: f"{i:06d}" + unit * repeat))
    assert kept < 16 << 20, f"{kept / 1e6:.1f} MB kept by 1,500 refused requests"


def test_a_query_one_character_over_the_bound_is_not_cached():
    now = datetime.now(UTC)
    base = len(signed_query("", now=now))
    at = signed_query("a" * (MAX_CACHED_QUERY - base), now=now)
    over = signed_query("a" * (MAX_CACHED_QUERY - base + 1), now=now)
    assert (len(at), len(over)) == (MAX_CACHED_QUERY, MAX_CACHED_QUERY + 1)
    clear()
    check(at)
    assert sum(sizes()) > 0
    clear()
    check(over)
    assert sum(sizes()) == 0
    with pytest.raises(BadRequest):
        parse_signed_request(over.replace("X-Sw-Date=", "X-Sw-Date=x"))
    assert sum(sizes()) == 0


@given(st.text(), st.text())
def test_the_uncached_pairs_encode_as_the_cached_ones(k: str, v: str):
    for cached in PAIR_ENCODINGS.values():
        assert UNCACHED_PAIRS[cached](k, v) == cached(k, v)
