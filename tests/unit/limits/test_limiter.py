"""proxy.limits.limiter: rates, buckets, the limiter, the global gate and single-use signatures.

Pure parts are tables with an explicit ``now``; the gate's queue runs on the autojump clock.
"""

from __future__ import annotations

import math
import tracemalloc

import pytest

from proxy.config import limit_spec_from_toml
from proxy.errors import BadRequest, ConfigError, Overloaded
from proxy.limits.limiter import (
    ALLOWED,
    CONCURRENCY,
    CREDENTIAL,
    RATE,
    USER,
    Limiter,
    LimitKey,
    LimitSpec,
    SeenSignatures,
    TokenBucket,
    TooManyRequests,
    end_user,
    limit_keys,
    parse_rate,
    replay_refusal,
    split_limits,
    storage_key,
    wants_single_use,
)

# --- rates and specs ----------------------------------------------------------------------------

RATES = [
    ("10/s", 10.0),
    ("600/min", 10.0),
    ("1/min", 1 / 60),
    ("1000/hour", 1000 / 3600),
    ("1.5/s", 1.5),
    (" 5 / S ", 5.0),
    ("2/d", 2 / 86400),
    ("30/minute", 0.5),
    ("7/sec", 7.0),
]


@pytest.mark.parametrize("text, expected", RATES)
def test_parse_rate(text: str, expected: float) -> None:
    assert parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["10", "10/x", "-1/s", "0/s", "abc", "10/s/s", "/s", "1e3/s", ""])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


SPEC_ERRORS = [
    dict(max_concurrent=0),
    dict(rate=0.0),
    dict(rate=-1.0),
    dict(rate=math.inf),
    dict(rate=math.nan),
    dict(rate=1.0, burst=0),
    dict(burst=5),  # burst without a rate
]


@pytest.mark.parametrize("kwargs", SPEC_ERRORS)
def test_limit_spec_refuses(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LimitSpec(**kwargs)


CAPACITIES = [
    (LimitSpec(rate=10.0), 10.0),
    (LimitSpec(rate=0.5), 1.0),  # at least one token, or nothing could ever pass
    (LimitSpec(rate=2.5), 3.0),
    (LimitSpec(rate=10.0, burst=3), 3.0),
    (LimitSpec(max_concurrent=4), 0.0),
]


@pytest.mark.parametrize("spec, capacity", CAPACITIES)
def test_capacity(spec: LimitSpec, capacity: float) -> None:
    assert spec.capacity == capacity


@pytest.mark.parametrize(
    "spec, text",
    [
        (LimitSpec(), "unlimited"),
        (LimitSpec(max_concurrent=4), "4 at once"),
        (LimitSpec(rate=10.0, burst=20), "10/s (burst 20)"),
        (LimitSpec(max_concurrent=2, rate=0.5), "2 at once, 30/min (burst 1)"),
    ],
)
def test_describe(spec: LimitSpec, text: str) -> None:
    assert spec.describe() == text


TOML_OK = [
    ({}, LimitSpec()),
    ({"max_concurrent": 3}, LimitSpec(max_concurrent=3)),
    ({"rate": "600/min", "burst": 20}, LimitSpec(rate=10.0, burst=20)),
    ({"rate": 2}, LimitSpec(rate=2.0)),
    ({"rate": 0.5, "max_concurrent": 1}, LimitSpec(max_concurrent=1, rate=0.5)),
]


@pytest.mark.parametrize("table, spec", TOML_OK)
def test_limit_spec_from_toml(table: dict, spec: LimitSpec) -> None:
    assert limit_spec_from_toml(table, "credentials[0].limits") == spec


TOML_BAD = [
    ("x", {"credentials[0].limits"}),
    ({"max_concurrent": 0}, {"credentials[0].limits.max_concurrent"}),
    ({"max_concurrent": True}, {"credentials[0].limits.max_concurrent"}),
    ({"max_concurrent": 1.5}, {"credentials[0].limits.max_concurrent"}),
    ({"rate": "fast"}, {"credentials[0].limits.rate"}),
    ({"rate": 0}, {"credentials[0].limits.rate"}),
    ({"rate": True}, {"credentials[0].limits.rate"}),
    ({"burst": 3}, {"credentials[0].limits.burst"}),
    ({"rps": 3}, {"credentials[0].limits.rps"}),
    ({"rate": "1/x", "burst": 0, "max": 1}, {"credentials[0].limits.rate", "credentials[0].limits.burst",
                                             "credentials[0].limits.max"}),
]  # fmt: skip


@pytest.mark.parametrize("table, paths", TOML_BAD)
def test_limit_spec_from_toml_problems(table: object, paths: set[str]) -> None:
    with pytest.raises(ConfigError) as info:
        limit_spec_from_toml(table, "credentials[0].limits")
    assert {p.path for p in info.value.problems} == paths


# --- who is counted -------------------------------------------------------------------------------

CRED = LimitSpec(rate=10.0)
USR = LimitSpec(max_concurrent=1)


@pytest.mark.parametrize(
    "args, expected",
    [
        (("app", None), ()),
        (("app", LimitSpec()), ()),
        (("app", CRED), (LimitKey(CREDENTIAL, "app", CRED),)),
        (("app", CRED, "alice", USR), (LimitKey(CREDENTIAL, "app", CRED), LimitKey(USER, "app/alice", USR))),
        (("app", None, "alice", USR), (LimitKey(USER, "app/alice", USR),)),
        (("app", CRED, None, USR), (LimitKey(CREDENTIAL, "app", CRED),)),
        (("app", CRED, "alice", None), (LimitKey(CREDENTIAL, "app", CRED),)),
    ],
)
def test_limit_keys(args: tuple, expected: tuple) -> None:
    assert limit_keys(*args) == expected


def test_split_limits_into_rate_and_concurrency() -> None:
    """A cached answer counts against request rates only: it holds no upstream slot."""
    both, rate_only, slots_only = (
        LimitSpec(max_concurrent=2, rate=5.0, burst=7),
        LimitSpec(rate=1.0),
        LimitSpec(max_concurrent=1),
    )
    keys = (LimitKey(CREDENTIAL, "app", both), LimitKey(USER, "app/a", rate_only), LimitKey(USER, "app/b", slots_only))
    assert split_limits(keys) == (
        (LimitKey(CREDENTIAL, "app", LimitSpec(rate=5.0, burst=7)), LimitKey(USER, "app/a", rate_only)),
        (LimitKey(CREDENTIAL, "app", LimitSpec(max_concurrent=2)), LimitKey(USER, "app/b", slots_only)),
    )
    assert split_limits(()) == ((), ())


@pytest.mark.parametrize(
    "params, param, expected",
    [
        ({"pw_user": "alice"}, "pw_user", "alice"),
        ({"pw_user": ""}, "pw_user", None),
        ({}, "pw_user", None),
        ({"pw_user": "alice"}, None, None),
        ({"pw_user": "alice"}, "", None),
        ({"user": "alice"}, "pw_user", None),
    ],
)
def test_end_user(params: dict, param: str | None, expected: str | None) -> None:
    assert end_user(params, param) == expected


def test_end_user_refuses_overlong_ids() -> None:
    with pytest.raises(BadRequest, match="pw_user is 201 characters"):
        end_user({"pw_user": "x" * 201}, "pw_user")


@pytest.mark.parametrize(
    "credential, params, param, expected",
    [
        (True, {}, None, True),
        (True, {"pw_single_use": "0"}, "pw_single_use", True),  # a signer cannot loosen it
        (False, {"pw_single_use": "1"}, "pw_single_use", True),
        (False, {"pw_single_use": "TRUE"}, "pw_single_use", True),
        (False, {"pw_single_use": "yes"}, "pw_single_use", True),
        (False, {"pw_single_use": "0"}, "pw_single_use", False),
        (False, {"pw_single_use": ""}, "pw_single_use", False),
        (False, {"pw_single_use": "1"}, None, False),
        (False, {}, "pw_single_use", False),
    ],
)
def test_wants_single_use(credential: bool, params: dict, param: str | None, expected: bool) -> None:
    assert wants_single_use(credential, params, param) is expected


def test_storage_key_is_bounded() -> None:
    assert storage_key(USER, "app/alice") == "user:app/alice"
    long = storage_key(USER, "app/" + "x" * 500)
    assert long.startswith("user:sha256:") and len(long) == len("user:sha256:") + 64


# --- token bucket -------------------------------------------------------------------------------

# (now, expected result of take): capacity 2, 1 token per second, full at t=0.
BUCKET_STEPS = [
    (0.0, 0.0),
    (0.0, 0.0),
    (0.0, 1.0),  # empty: one second until the next token
    (0.5, 0.5),
    (1.0, 0.0),
    (1.0, 1.0),
    (0.5, 1.0),  # a clock that went back adds nothing
    (10.0, 0.0),  # long idle: refilled to capacity, not beyond
    (10.0, 0.0),
    (10.0, 1.0),
]


def test_token_bucket_steps() -> None:
    bucket = TokenBucket.full(rate=1.0, capacity=2.0, now=0.0)
    for now, expected in BUCKET_STEPS:
        assert bucket.take(now) == pytest.approx(expected), (now, expected)


def test_token_bucket_full_and_reshape() -> None:
    bucket = TokenBucket.full(rate=2.0, capacity=4.0, now=0.0)
    assert bucket.is_full(0.0)
    bucket.take(0.0)
    assert not bucket.is_full(0.0) and bucket.is_full(0.5)
    bucket.reshape(rate=1.0, capacity=2.0)
    assert bucket.level(0.0) == 2.0  # clamped down, not refilled


# --- the limiter --------------------------------------------------------------------------------


def key(scope: str = CREDENTIAL, name: str = "app", **spec: object) -> LimitKey:
    return LimitKey(scope, name, LimitSpec(**spec))


def test_rate_limit_refuses_then_recovers() -> None:
    limiter = Limiter()
    keys = [key(rate=1.0, burst=2)]
    assert limiter.acquire_nowait(keys, 0.0).allowed
    assert limiter.acquire_nowait(keys, 0.0).allowed
    decision = limiter.acquire_nowait(keys, 0.0)
    assert (decision.allowed, decision.scope, decision.limit, decision.key) == (False, CREDENTIAL, RATE, "app")
    assert decision.retry_after == pytest.approx(1.0)
    assert decision.code == "credential_rate_limit"
    assert not limiter.acquire_nowait(keys, 0.99).allowed
    assert limiter.acquire_nowait(keys, 1.0).allowed


def test_concurrency_limit_and_release() -> None:
    limiter = Limiter(concurrency_retry_after=2.0)
    keys = [key(max_concurrent=2)]
    first, second = limiter.acquire_nowait(keys, 0.0), limiter.acquire_nowait(keys, 0.0)
    assert first.allowed and second.allowed and first.lease != second.lease
    third = limiter.acquire_nowait(keys, 0.0)
    assert (third.allowed, third.limit, third.retry_after) == (False, CONCURRENCY, 2.0)
    limiter.release(first.lease)
    limiter.release(first.lease)  # twice is harmless: counters never go below zero
    assert limiter.in_flight(CREDENTIAL, "app") == 1
    assert limiter.acquire_nowait(keys, 0.0).allowed
    assert limiter.in_flight(CREDENTIAL, "app") == 2


def test_refusal_takes_nothing_from_other_keys() -> None:
    limiter = Limiter()
    cred = key(CREDENTIAL, "app", rate=1.0, burst=1)
    user = key(USER, "app/alice", max_concurrent=1)
    held = limiter.acquire_nowait([key(USER, "app/alice", max_concurrent=1)], 0.0)
    decision = limiter.acquire_nowait([cred, user], 0.0)
    assert (decision.scope, decision.limit) == (USER, CONCURRENCY)
    limiter.release(held.lease)
    assert limiter.acquire_nowait([cred, user], 0.0).allowed  # the credential's token was still there


# Which refusal is reported when several limits are hit: the longest wait, then key order.
WORST = [
    ([key(CREDENTIAL, "app", rate=2.0, burst=1), key(USER, "app/u", rate=0.5, burst=1)], (USER, RATE, 2.0)),
    ([key(CREDENTIAL, "app", rate=0.5, burst=1), key(USER, "app/u", rate=2.0, burst=1)], (CREDENTIAL, RATE, 2.0)),
    ([key(CREDENTIAL, "app", rate=0.5, burst=1, max_concurrent=1)], (CREDENTIAL, RATE, 2.0)),
    ([key(CREDENTIAL, "app", rate=1.0, burst=1, max_concurrent=1)], (CREDENTIAL, CONCURRENCY, 1.0)),  # tie
    ([key(CREDENTIAL, "app", rate=4.0, burst=1, max_concurrent=1)], (CREDENTIAL, CONCURRENCY, 1.0)),
]


@pytest.mark.parametrize("keys, expected", WORST)
def test_longest_wait_is_reported(keys: list[LimitKey], expected: tuple) -> None:
    limiter = Limiter()
    assert limiter.acquire_nowait(keys, 0.0).allowed
    decision = limiter.acquire_nowait(keys, 0.0)
    assert (decision.scope, decision.limit, decision.retry_after) == pytest.approx(expected)


def test_unlimited_and_empty_keys_hold_nothing() -> None:
    limiter = Limiter()
    assert limiter.acquire_nowait([], 0.0) is ALLOWED
    assert limiter.acquire_nowait([key()], 0.0) is ALLOWED
    rate_only = limiter.acquire_nowait([key(rate=5.0)], 0.0)
    assert rate_only.allowed and rate_only.lease is None
    assert len(limiter) == 1


def test_duplicate_keys_count_once() -> None:
    limiter = Limiter()
    k = key(max_concurrent=1)
    assert limiter.acquire_nowait([k, k], 0.0).allowed
    assert limiter.in_flight(CREDENTIAL, "app") == 1


def test_spec_change_reshapes_bucket() -> None:
    limiter = Limiter()
    assert limiter.acquire_nowait([key(rate=1.0, burst=10)], 0.0).allowed  # 9 left
    keys = [key(rate=1.0, burst=2)]  # reloaded: smaller bucket
    assert limiter.acquire_nowait(keys, 0.0).allowed
    assert limiter.acquire_nowait(keys, 0.0).allowed
    assert not limiter.acquire_nowait(keys, 0.0).allowed


def test_idle_entries_are_forgotten() -> None:
    limiter = Limiter()
    for i in range(5):
        limiter.acquire_nowait([key(name=f"k{i}", rate=1.0, burst=1)], 0.0)
    busy = limiter.acquire_nowait([key(name="busy", max_concurrent=5)], 0.0)
    assert len(limiter) == 6
    # At t=1 every bucket is full again: forgetting them changes nothing, so they go.
    limiter.acquire_nowait([key(name="late", rate=1.0, burst=1)], 1.0)
    assert len(limiter) == 2  # "busy" holds a slot, "late" was just used
    assert limiter.in_flight(CREDENTIAL, "busy") == 1
    limiter.release(busy.lease)
    limiter.acquire_nowait([], 5.0)
    assert len(limiter) == 0


def test_key_cap_evicts_least_recently_used_without_slots() -> None:
    limiter = Limiter(max_keys=3)
    held = limiter.acquire_nowait([key(name="held", max_concurrent=1)], 0.0)
    for i in range(5):  # buckets still refilling: only the cap can remove them
        limiter.acquire_nowait([key(name=f"k{i}", rate=0.001, burst=1)], 0.0)
    assert len(limiter) == 3
    assert limiter.evictions == 3
    assert limiter.in_flight(CREDENTIAL, "held") == 1  # never evicted while a slot is in use
    assert not limiter.acquire_nowait([key(name="held", max_concurrent=1)], 0.0).allowed
    limiter.release(held.lease)


def test_refusal_is_a_429_with_retry_after() -> None:
    spec = LimitSpec(rate=1.0, burst=5)
    limiter = Limiter()
    for _ in range(5):
        limiter.acquire_nowait([LimitKey(USER, "app/alice", spec)], 0.0)
    decision = limiter.acquire_nowait([LimitKey(USER, "app/alice", spec)], 0.25)
    exc = decision.refusal()
    assert isinstance(exc, TooManyRequests)
    assert (exc.status, exc.code, exc.retry_after) == (429, "user_rate_limit", 1)
    assert "end user 'app/alice'" in exc.message and "1/s (burst 5)" in exc.message
    with pytest.raises(TooManyRequests):
        decision.raise_if_refused()
    ALLOWED.raise_if_refused()


def test_limiter_memory_stays_flat_under_a_flood_of_users() -> None:
    limiter = Limiter(max_keys=1000)
    spec = LimitSpec(max_concurrent=2, rate=1.0, burst=1)
    tracemalloc.start()
    try:
        now = 0.0
        for i in range(3000):  # warm up to the cap
            limiter.release(limiter.acquire_nowait([LimitKey(USER, f"app/u{i}", spec)], now).lease)
        baseline = tracemalloc.get_traced_memory()[0]
        for i in range(3000, 30000):
            now += 0.0001
            limiter.release(limiter.acquire_nowait([LimitKey(USER, f"app/u{i}", spec)], now).lease)
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert len(limiter) <= 1000
    assert grown < 64 * 1024, f"memory grew by {grown} bytes"


# --- single-use signatures -------------------------------------------------------------------------


def test_seen_signatures_refuse_replays_until_expiry() -> None:
    seen = SeenSignatures()
    assert seen.check_and_add("sig-a", expires_at=100.0, now=0.0)
    assert not seen.check_and_add("sig-a", expires_at=100.0, now=50.0)
    assert seen.check_and_add("sig-b", expires_at=10.0, now=50.0)  # already expired: nothing kept
    assert len(seen) == 1
    assert seen.check_and_add("sig-a", expires_at=200.0, now=100.0)  # forgotten with its URL


def test_seen_signatures_memory_is_bounded_by_live_urls() -> None:
    seen = SeenSignatures(max_entries=1000)
    for i in range(100_000):  # one new URL per second, each valid for 300 s
        assert seen.check_and_add(f"sig{i}", expires_at=i + 300.0, now=float(i))
    assert len(seen) == 300
    assert len(seen._heap) == 300


def test_seen_signatures_full_refuses_instead_of_forgetting() -> None:
    seen = SeenSignatures(max_entries=2)
    assert seen.check_and_add("a", 100.0, 0.0)
    assert seen.check_and_add("b", 50.0, 0.0)
    with pytest.raises(Overloaded) as info:
        seen.check_and_add("c", 100.0, 10.0)
    assert (info.value.code, info.value.retry_after) == ("single_use_capacity", 40)
    assert not seen.check_and_add("a", 100.0, 10.0)  # still remembered
    assert seen.check_and_add("c", 100.0, 50.0)  # "b" expired, room again


def test_replay_refusal() -> None:
    exc = replay_refusal()
    assert (exc.status, exc.code) == (403, "already_used")
