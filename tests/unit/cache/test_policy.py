"""proxy.cache.policy: who may cache, the key, what may be stored, Cache-Status. Pure, table-driven."""

from __future__ import annotations

import pytest

from proxy.cache.policy import (
    CacheConfig,
    CachePlan,
    CacheRules,
    Directives,
    cache_key,
    cache_plan,
    cache_scope,
    cache_status,
    content_length,
    delta_seconds,
    key_header_values,
    keyed_request_headers,
    replay_headers,
    request_directives,
    short_key,
    signed_ttl,
    unstorable_reason,
)
from proxy.errors import BadRequest
from proxy.forwarding import forwarded_client_headers

# --- request directives ----------------------------------------------------------------------------

DIRECTIVE_CASES = [
    (None, None, Directives()),
    ("", None, Directives()),
    ("no-cache", None, Directives(no_cache=True)),
    ("No-Cache", None, Directives(no_cache=True)),
    ("no-store", None, Directives(no_store=True)),
    ("only-if-cached", None, Directives(only_if_cached=True)),
    ("max-age=0, no-store , only-if-cached", None, Directives(no_store=True, only_if_cached=True)),
    ('no-cache="set-cookie"', None, Directives(no_cache=True)),  # argument ignored: still no-cache
    ("max-age=0", None, Directives()),  # not one of the three the issue names
    ("no-cacheX", None, Directives()),  # a different directive, not a prefix match
    (None, "no-cache", Directives(no_cache=True)),  # Pragma without Cache-Control (RFC 9111 §5.4)
    ("max-age=10", "no-cache", Directives()),  # Cache-Control present: Pragma ignored
]


@pytest.mark.parametrize(("cache_control", "pragma", "expected"), DIRECTIVE_CASES)
def test_request_directives(cache_control: str | None, pragma: str | None, expected: Directives) -> None:
    assert request_directives(cache_control, pragma) == expected


TTL_CASES = [
    # signed value, credential default, max_ttl -> ttl
    (None, 0, 100, 0),  # neither: never cached
    (None, 60, 100, 60),  # the credential's default
    ("30", 60, 100, 30),  # the signed parameter wins
    ("0", 60, 100, 0),  # ... including turning the default off for one URL
    ("86400", 0, 3600, 3600),  # capped by max_ttl
    ("007", 0, 100, 7),
]


@pytest.mark.parametrize(("value", "default", "max_ttl", "expected"), TTL_CASES)
def test_signed_ttl(value: str | None, default: int, max_ttl: int, expected: int) -> None:
    assert signed_ttl(value, default, max_ttl) == expected


@pytest.mark.parametrize("value", ["", "-1", "1.5", "1e3", "ten", "٣", "12345678901"])
def test_signed_ttl_refuses_what_is_not_seconds(value: str) -> None:
    with pytest.raises(BadRequest) as info:
        signed_ttl(value, 0, 100, param="pw_cache")
    assert info.value.code == "invalid_cache_param" and info.value.status == 400
    assert "pw_cache" in info.value.message


PLAN_CASES = [
    (0, Directives(), "POST", None),
    (60, Directives(), "PUT", None),
    (60, Directives(), "DELETE", None),
    (60, Directives(), "POST", CachePlan(60, lookup=True, store=True, only_if_cached=False)),
    (60, Directives(), "GET", CachePlan(60, lookup=True, store=True, only_if_cached=False)),
    (60, Directives(no_cache=True), "POST", CachePlan(60, lookup=False, store=True, only_if_cached=False)),
    (60, Directives(no_store=True), "POST", CachePlan(60, lookup=False, store=False, only_if_cached=False)),
    (60, Directives(only_if_cached=True), "POST", CachePlan(60, lookup=True, store=True, only_if_cached=True)),
    (60, Directives(True, True, True), "POST", CachePlan(60, lookup=False, store=False, only_if_cached=True)),
]


@pytest.mark.parametrize(("ttl", "directives", "method", "expected"), PLAN_CASES)
def test_cache_plan(ttl: int, directives: Directives, method: str, expected: CachePlan | None) -> None:
    assert cache_plan(ttl, directives, method) == expected


def test_no_store_is_a_bypass() -> None:
    plan = cache_plan(60, Directives(no_store=True), "POST")
    assert plan is not None and plan.bypass
    assert not cache_plan(60, Directives(no_cache=True), "POST").bypass  # type: ignore[union-attr]


# --- the key -----------------------------------------------------------------------------------------

BASE = {
    "scope": "cred:app",
    "method": "POST",
    "url": "https://api.openai.com/v1/chat/completions",
    "body": b'{"model":"gpt-4o-mini","temperature":0,"messages":[{"role":"user","content":"hi"}]}',
    "injected": (("Authorization", "Bearer sk-one"),),
    "key_headers": (b"content-type: application/json",),
    "user": None,
}

PINNED_KEY = "5abf4e2e1ec791a4b487fba1656b6db29ed170b36312a5da8c1360046fa3d83d"


def test_cache_key_golden_vector() -> None:
    """Pinned: a change of the key's layout must be deliberate (it orphans every stored entry)."""
    assert cache_key(**BASE) == PINNED_KEY  # type: ignore[arg-type]


VARIANTS = [
    ("other credential", {"scope": "cred:other"}),
    ("shared namespace", {"scope": "ns:team"}),
    ("method", {"method": "GET"}),
    ("url", {"url": "https://api.openai.com/v1/chat/completions?x=1"}),
    ("one body byte", {"body": BASE["body"][:-1] + b" "}),  # type: ignore[index]
    ("empty body", {"body": b""}),
    ("other API key", {"injected": (("Authorization", "Bearer sk-two"),)}),
    ("injected header name", {"injected": (("X-Api-Key", "Bearer sk-one"),)}),
    ("no injected header", {"injected": ()}),
    ("accept-encoding", {"key_headers": (b"content-type: application/json", b"accept-encoding: gzip")}),
    ("end user", {"user": "alice"}),
    ("empty end user", {"user": ""}),
]


@pytest.mark.parametrize(("why", "change"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_cache_key_changes_with_every_part(why: str, change: dict) -> None:
    assert cache_key(**{**BASE, **change}) != cache_key(**BASE)  # type: ignore[arg-type]


def test_cache_key_is_unambiguous_across_part_boundaries() -> None:
    """Moving bytes from one part into the next must change the key (length prefixes)."""
    a = cache_key(**{**BASE, "url": "https://h/ab", "body": b"c"})  # type: ignore[arg-type]
    b = cache_key(**{**BASE, "url": "https://h/a", "body": b"bc"})  # type: ignore[arg-type]
    assert a != b
    c = cache_key(**{**BASE, "injected": (("a", "bc"),)})  # type: ignore[arg-type]
    d = cache_key(**{**BASE, "injected": (("ab", "c"),)})  # type: ignore[arg-type]
    assert c != d


def test_cache_key_never_holds_the_secret() -> None:
    key = cache_key(**BASE)  # type: ignore[arg-type]
    assert len(key) == 64 and all(ch in "0123456789abcdef" for ch in key)
    assert "sk-one" not in key and short_key(key) == key[:12]


def test_method_case_does_not_matter() -> None:
    assert cache_key(**{**BASE, "method": "post"}) == cache_key(**BASE)  # type: ignore[arg-type]


def test_scope() -> None:
    assert cache_scope("app", "") == "cred:app"
    assert cache_scope("app", "team") == cache_scope("other", "team") == "ns:team"


KEY_HEADER_CASES = [
    ([], (), ()),
    ([(b"Accept", b"text/event-stream"), (b"User-Agent", b"x")], (), (b"accept: text/event-stream",)),
    (
        [(b"content-type", b"application/json"), (b"accept-encoding", b"gzip"), (b"accept-encoding", b" br ")],
        (),
        (b"accept-encoding: gzip, br", b"content-type: application/json"),
    ),
    # The credential injects Authorization: the client's never reaches the upstream, so it is not keyed.
    ([(b"authorization", b"Bearer mine"), (b"accept", b"*/*")], ("Authorization",), (b"accept: */*",)),
    ([(b"authorization", b"Bearer mine")], (), (b"authorization: Bearer mine",)),
]


@pytest.mark.parametrize(("headers", "injected", "expected"), KEY_HEADER_CASES)
def test_key_header_values(headers: list, injected: tuple, expected: tuple) -> None:
    assert key_header_values(headers, CacheConfig().key_headers, injected) == expected


# --- what may be stored --------------------------------------------------------------------------------

JSON = (b"content-type", b"application/json")
STORE_CASES = [
    (200, [JSON], CacheRules(), None),
    (200, [JSON, (b"content-length", b"1000")], CacheRules(), None),
    (200, [JSON, (b"content-length", b"1001")], CacheRules(), "over max_entry_bytes"),
    (201, [JSON], CacheRules(), "status 201"),
    (206, [JSON], CacheRules(), "status 206"),
    (429, [JSON], CacheRules(), "status 429"),
    (500, [JSON], CacheRules(), "status 500"),
    (200, [JSON, (b"cache-control", b"no-store")], CacheRules(), "no-store"),
    (200, [JSON, (b"Cache-Control", b"max-age=0, Private")], CacheRules(), "private"),
    (200, [JSON, (b"cache-control", b"no-store")], CacheRules(honour_upstream_no_store=False), None),
    (200, [JSON, (b"cache-control", b"no-cache")], CacheRules(), None),  # stored; the ttl is the signer's
    (200, [JSON, (b"vary", b"Accept-Encoding")], CacheRules(), None),  # keyed by default
    (200, [JSON, (b"vary", b"Origin")], CacheRules(), "Vary: origin"),
    (200, [JSON, (b"vary", b"*")], CacheRules(), "Vary: *"),
]


@pytest.mark.parametrize(("status", "headers", "rules", "reason"), STORE_CASES)
def test_unstorable_reason(status: int, headers: list, rules: CacheRules, reason: str | None) -> None:
    found = unstorable_reason(status, headers, rules, max_entry_bytes=1000, key_headers=CacheConfig().key_headers)
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found


STATUS_CASES = [
    (("hit",), {"ttl": 86399.7}, b"parkway; hit; ttl=86399"),
    (("hit",), {"ttl": -3}, b"parkway; hit; ttl=0"),
    (("miss",), {"stored": True}, b"parkway; fwd=uri-miss; stored"),
    (("miss",), {}, b"parkway; fwd=uri-miss"),
    (("refresh",), {"stored": True}, b"parkway; fwd=request; stored"),
    (("collapsed",), {}, b"parkway; fwd=uri-miss; collapsed"),
    (("bypass",), {}, b"parkway; fwd=bypass"),
    (("miss",), {"detail": 'status "429"'}, b'parkway; fwd=uri-miss; detail="status 429"'),
]


@pytest.mark.parametrize(("args", "kwargs", "expected"), STATUS_CASES)
def test_cache_status(args: tuple, kwargs: dict, expected: bytes) -> None:
    assert cache_status(*args, **kwargs) == (b"cache-status", expected)


def test_replay_headers_add_age() -> None:
    stored = ((b"content-type", b"text/event-stream"), (b"age", b"5"), (b"x-upstream", b"1"))
    assert replay_headers(stored, 12.9) == [
        (b"content-type", b"text/event-stream"),
        (b"x-upstream", b"1"),
        (b"age", b"17"),
    ]
    assert replay_headers(((b"age", b"junk"),), 0.2) == [(b"age", b"0")]


@pytest.mark.parametrize(("cls", "kwargs"), [(CacheRules, {"replay": "sometimes"}), (CacheConfig, {"backend": "disk"})])
def test_dataclasses_refuse_unknown_choices(cls: type, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        cls(**kwargs)


# --- what the key covers is all the upstream sees (issue 19, finding 1) ------------------------------

KEY_HEADERS = ("accept", "openai-organization", "authorization")

KEYED_CASES = [
    # (client headers, injected names, the client headers the upstream may see = those keyed)
    ([(b"accept", b"*/*"), (b"user-agent", b"x"), (b"x-evil", b"1")], set(), [(b"accept", b"*/*")]),
    # A header named in Connection is hop-by-hop: neither forwarded nor keyed.
    (
        [(b"openai-organization", b"org-victim"), (b"connection", b"OpenAI-Organization")],
        set(),
        [],
    ),
    ([(b"openai-organization", b"org-a"), (b"connection", b"close, openai-organization ")], set(), []),
    # Directives that would change what the upstream answers are not forwarded either.
    ([(b"cache-control", b"no-cache"), (b"accept", b"a")], set(), [(b"accept", b"a")]),
    # The credential's injected value wins: the client's is neither forwarded nor keyed.
    ([(b"authorization", b"Bearer client")], {b"authorization"}, []),
    ([(b"x-sw-proxy", b"http://u"), (b"cookie", b"a=1")], set(), []),
]


@pytest.mark.parametrize(("client", "injected", "expected"), KEYED_CASES)
def test_keyed_request_headers(client: list, injected: set, expected: list) -> None:
    keyed = keyed_request_headers(forwarded_client_headers(client, injected), KEY_HEADERS)
    assert keyed == expected
    # Every header that may reach the upstream is in the key, and nothing else is.
    assert key_header_values(keyed, KEY_HEADERS) == key_header_values(expected, KEY_HEADERS)


def test_a_connection_named_header_does_not_change_the_key() -> None:
    def key(headers: list) -> str:
        keyed = keyed_request_headers(forwarded_client_headers(headers, set()), KEY_HEADERS)
        return cache_key(scope="s", method="POST", url="u", body=b"", injected=(),
                         key_headers=key_header_values(keyed, KEY_HEADERS))  # fmt: skip

    plain = key([])
    stripped = key([(b"openai-organization", b"org-victim"), (b"connection", b"openai-organization")])
    victim = key([(b"openai-organization", b"org-victim")])
    assert stripped == plain != victim


# --- upstream numbers, bounded (finding 4) ------------------------------------------------------------

DELTA_CASES = [
    (None, None),
    (b"0", 0),
    (b" 42 ", 42),
    (b"2147483648", 2**31),
    (b"99999999999", 2**31),
    (b"9" * 5000, 2**31),
    (b"-1", None),
    (b"1.5", None),
    (b"\xb2", None),
    ("\u0663", None),  # an Arabic-Indic digit: str.isdigit() says yes, HTTP says no
    (b"", None),
]


@pytest.mark.parametrize(("value", "expected"), DELTA_CASES)
def test_delta_seconds(value: bytes | str | None, expected: int | None) -> None:
    assert delta_seconds(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"10", 10), (b"9" * 5000, 2**62), (b"1e3", None), (None, None), (b"18446744073709551616", 2**62)],
)
def test_content_length_is_bounded(value: bytes | None, expected: int | None) -> None:
    assert content_length(value) == expected


def test_a_hostile_age_never_breaks_a_hit() -> None:
    stored = [(b"content-type", b"application/json"), (b"age", b"9" * 5000)]
    assert replay_headers(stored, 12.7)[-1] == (b"age", str(2**31).encode())
    assert replay_headers([(b"age", b"junk")], 3)[-1] == (b"age", b"3")


def test_a_huge_content_length_is_over_max_entry_bytes() -> None:
    reason = unstorable_reason(200, [(b"content-length", b"9" * 5000)], CacheRules(), max_entry_bytes=10,
                               key_headers=())  # fmt: skip
    assert reason is not None and "over max_entry_bytes" in reason


# --- close-delimited answers (finding 5) ----------------------------------------------------------------


def test_a_close_delimited_answer_is_not_stored() -> None:
    reason = unstorable_reason(200, [], CacheRules(), max_entry_bytes=10, key_headers=(), close_delimited=True)
    assert reason == "answer ends at the connection's close (no length, not chunked)"
    assert unstorable_reason(200, [], CacheRules(), max_entry_bytes=10, key_headers=()) is None
