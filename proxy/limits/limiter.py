"""Limits: per-credential and per-user rate and concurrency, and the single-use signature set.

Everything here decides without I/O and without reading a clock: callers pass ``now`` (the
global in-flight gate, which may wait, is :mod:`proxy.limits.admission`). Memory is bounded everywhere: idle buckets are forgotten once they would
be full again (forgetting them changes nothing), the number of keys has an LRU cap, and
remembered signatures leave with their URL's expiry.

Which clock ``now`` is: the :class:`Limiter` only compares its own ``now`` values, so any
monotonic clock works (``trio.current_time()``); :class:`SeenSignatures` compares ``now`` with
a URL's expiry, so both are UNIX timestamps (seconds).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import BadRequest, Forbidden, Overloaded, TooManyRequests

# Scopes and limit kinds, as reported in refusals (``Decision.scope`` / ``Decision.limit``).
CREDENTIAL = "credential"
USER = "user"
CONCURRENCY = "concurrency"
RATE = "rate"

MAX_USER_ID_CHARS = 200  # longer end-user ids are refused: they end up in keys and log lines


# --- limit specifications --------------------------------------------------------------------

_RATE_UNITS = {
    "s": 1, "sec": 1, "second": 1,
    "m": 60, "min": 60, "minute": 60,
    "h": 3600, "hour": 3600,
    "d": 86400, "day": 86400,
}  # fmt: skip
_RATE_TEXT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*\Z")


def parse_rate(text: str) -> float:
    """``"10/s"``, ``"600/min"``, ``"1000/hour"``, ``"1.5/s"`` → tokens per second.

    Raises ValueError saying what is wrong.
    """
    match = _RATE_TEXT.match(text.lower())
    if not match or match[2] not in _RATE_UNITS:
        raise ValueError(f"{text!r} is not a rate such as '10/s', '600/min' or '1000/hour'")
    rate = float(match[1]) / _RATE_UNITS[match[2]]
    if rate <= 0:
        raise ValueError(f"{text!r} must allow more than 0 requests")
    return rate


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """What one key (a credential, or one end user of it) may do; ``None`` means no limit.

    ``rate`` is tokens per second; ``burst`` is the bucket's capacity, by default one second's
    worth of tokens (at least 1), so ``600/min`` alone allows 10 at once, then 10 per second.
    """

    max_concurrent: int | None = None
    rate: float | None = None
    burst: int | None = None

    def __post_init__(self) -> None:
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError("rate must be a finite number above 0")
        if self.burst is not None:
            if self.burst < 1:
                raise ValueError("burst must be at least 1")
            if self.rate is None:
                raise ValueError("burst needs a rate")

    @property
    def capacity(self) -> float:
        """Tokens a full bucket holds (0 without a rate)."""
        if self.rate is None:
            return 0.0
        return float(self.burst if self.burst is not None else max(1, math.ceil(self.rate)))

    @property
    def unlimited(self) -> bool:
        return self.max_concurrent is None and self.rate is None

    def describe(self) -> str:
        """Human text for refusal messages: ``"10 at once, 5/s (burst 10)"``."""
        parts = []
        if self.max_concurrent is not None:
            parts.append(f"{self.max_concurrent} at once")
        if self.rate is not None:
            rate = f"{self.rate:g}/s" if self.rate >= 1 else f"{self.rate * 60:g}/min"
            parts.append(f"{rate} (burst {self.capacity:g})")
        return ", ".join(parts) or "unlimited"


# --- who a request counts against -------------------------------------------------------------


class LimitKey(NamedTuple):
    """One limit to check: ``scope`` (CREDENTIAL or USER), the key within it, and its spec."""

    scope: str
    key: str
    spec: LimitSpec


def end_user(extra_params: Mapping[str, str], param: str | None) -> str | None:
    """The end user named by the signed parameter ``param`` (e.g. ``pw_user``), or None.

    The parameter is covered by the signature, so it is the signer's word, not the browser's.
    An empty value counts as absent; an over-long one is refused (it would bloat keys and logs).
    """
    if not param:
        return None
    user = extra_params.get(param)
    if not user:
        return None
    if len(user) > MAX_USER_ID_CHARS:
        raise BadRequest(
            f"signed parameter {param} is {len(user)} characters long; the limit is {MAX_USER_ID_CHARS}",
            code="malformed_signed_url",
        )
    return user


_TRUE = frozenset({"1", "true", "yes", "on"})


def wants_single_use(credential_single_use: bool, extra_params: Mapping[str, str], param: str | None) -> bool:
    """True when the credential says every URL is single-use, or the signer asked for it
    with the signed parameter ``param`` (``pw_single_use=1``); the signer can only tighten."""
    if credential_single_use:
        return True
    if not param:
        return False
    return extra_params.get(param, "").strip().lower() in _TRUE


def limit_keys(
    credential_id: str,
    credential_limits: LimitSpec | None,
    user: str | None = None,
    user_limits: LimitSpec | None = None,
) -> tuple[LimitKey, ...]:
    """The keys one request is counted against, credential first; unlimited specs are left out.

    A user's key is qualified by the credential, so two signers' ``alice`` are two users.
    """
    keys = []
    if credential_limits is not None and not credential_limits.unlimited:
        keys.append(LimitKey(CREDENTIAL, credential_id, credential_limits))
    if user is not None and user_limits is not None and not user_limits.unlimited:
        keys.append(LimitKey(USER, f"{credential_id}/{user}", user_limits))
    return tuple(keys)


def split_limits(keys: Iterable[LimitKey]) -> tuple[tuple[LimitKey, ...], tuple[LimitKey, ...]]:
    """``keys`` as their request-rate part and their concurrency part. A request served without
    an upstream call (a cached answer) counts against the first only: it holds no upstream slot."""
    rate, concurrency = [], []
    for scope, key, spec in keys:
        if spec.rate is not None:
            rate.append(LimitKey(scope, key, LimitSpec(rate=spec.rate, burst=spec.burst)))
        if spec.max_concurrent is not None:
            concurrency.append(LimitKey(scope, key, LimitSpec(max_concurrent=spec.max_concurrent)))
    return tuple(rate), tuple(concurrency)


def storage_key(scope: str, key: str) -> str:
    """A compact, bounded text for (scope, key), for shared stores such as Redis."""
    if len(key) > 100:
        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return f"{scope}:{key}"


# --- decisions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lease:
    """Concurrency slots held by one request; give it back with ``release`` when the request ends."""

    id: str
    keys: tuple[tuple[str, str], ...]  # (scope, key) whose concurrency counter was incremented


@dataclass(frozen=True, slots=True)
class Decision:
    """Allowed (with the lease to give back), or the limit that refused and when to retry."""

    allowed: bool
    lease: Lease | None = None
    scope: str | None = None  # CREDENTIAL | USER
    limit: str | None = None  # CONCURRENCY | RATE
    key: str | None = None
    spec: LimitSpec | None = None
    retry_after: float = 0.0  # seconds

    @property
    def code(self) -> str | None:
        """``credential_rate_limit``, ``user_concurrency_limit``, ...: stable, for logs and metrics."""
        return None if self.allowed else f"{self.scope}_{self.limit}_limit"

    def refusal(self) -> TooManyRequests:
        """The 429 to answer; Retry-After is whole seconds, at least 1."""
        what = "concurrent streams" if self.limit == CONCURRENCY else "request rate"
        owner = f"credential {self.key!r}" if self.scope == CREDENTIAL else f"end user {self.key!r}"
        message = (
            f"{what} limit of {owner} reached ({self.spec.describe() if self.spec else 'limit'}); "
            f"retry after {self.retry_after:.3g} s"
        )
        return TooManyRequests(message, code=self.code, retry_after=max(1, math.ceil(self.retry_after)))

    def raise_if_refused(self) -> None:
        if not self.allowed:
            raise self.refusal()


ALLOWED = Decision(True)


def refused(scope: str, limit: str, key: str, spec: LimitSpec, retry_after: float) -> Decision:
    return Decision(False, scope=scope, limit=limit, key=key, spec=spec, retry_after=retry_after)


# --- token bucket -------------------------------------------------------------------------------


def refill(tokens: float, updated: float, now: float, rate: float, capacity: float) -> float:
    """Tokens after refilling from ``updated`` to ``now``; a clock that went back adds nothing."""
    return min(capacity, tokens + max(0.0, now - updated) * rate)


@dataclass(slots=True)
class TokenBucket:
    """``capacity`` tokens, ``rate`` added per second; a request takes one."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, capacity: float, now: float) -> TokenBucket:
        return cls(rate, capacity, capacity, now)

    def level(self, now: float) -> float:
        return refill(self.tokens, self.updated, now, self.rate, self.capacity)

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0 when one is)."""
        level = self.level(now)
        return 0.0 if level >= 1 else (1 - level) / self.rate

    def take(self, now: float) -> float:
        """Take a token if there is one: 0, else the seconds until there will be (nothing taken)."""
        wait = self.wait(now)
        if wait == 0:
            self.tokens = self.level(now) - 1
            self.updated = max(self.updated, now)
        return wait

    def is_full(self, now: float) -> bool:
        return self.level(now) >= self.capacity

    def reshape(self, rate: float, capacity: float) -> None:
        """Follow a changed spec (config reload) without granting a refill."""
        self.rate, self.capacity = rate, capacity
        self.tokens = min(self.tokens, capacity)


# --- the in-memory limiter ----------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    bucket: TokenBucket | None = None
    in_flight: int = 0

    def idle(self, now: float) -> bool:
        """Forgetting it changes nothing: no slot held and the bucket would be full anyway."""
        return self.in_flight == 0 and (self.bucket is None or self.bucket.is_full(now))


class Limiter:
    """Token buckets and concurrency counters keyed by (scope, key), in this process's memory.

    ``acquire_nowait`` checks every key before changing any, so a request refused by its
    user's limit does not spend its credential's token. Memory: idle entries are swept a few
    at a time from the least recently used end; past ``max_keys``, the least recently used
    entries without a slot in use are dropped (``evictions`` counts them: each may let its key
    briefly exceed its rate, never its concurrency).
    """

    SWEEP = 8  # idle entries looked at per call: constant work, still keeps up with any traffic

    def __init__(self, *, max_keys: int = 100_000, concurrency_retry_after: float = 1.0):
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self.concurrency_retry_after = concurrency_retry_after
        self.evictions = 0
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lease_ids = itertools.count(1)
        self._live: set[str] = set()  # leases not yet released: at most one per request in flight

    def __len__(self) -> int:
        return len(self._entries)

    def in_flight(self, scope: str, key: str) -> int:
        entry = self._entries.get((scope, key))
        return entry.in_flight if entry else 0

    def check_nowait(self, keys: Sequence[LimitKey | tuple[str, str, LimitSpec]], now: float) -> Decision:
        """The decision ``acquire_nowait`` would make, changing nothing."""
        worst: Decision | None = None
        for scope, key, spec in unique_limits(keys):
            entry = self._entries.get((scope, key))
            if spec.max_concurrent is not None and entry and entry.in_flight >= spec.max_concurrent:
                candidate = refused(scope, CONCURRENCY, key, spec, self.concurrency_retry_after)
                worst = candidate if worst is None or candidate.retry_after > worst.retry_after else worst
            if spec.rate is not None and entry and entry.bucket:
                tokens = min(entry.bucket.tokens, spec.capacity)  # as acquire will reshape it
                bucket = TokenBucket(spec.rate, spec.capacity, tokens, entry.bucket.updated)
                wait = bucket.wait(now)
                if wait > 0 and (worst is None or wait > worst.retry_after):
                    worst = refused(scope, RATE, key, spec, wait)
        return worst or ALLOWED

    def acquire_nowait(self, keys: Sequence[LimitKey | tuple[str, str, LimitSpec]], now: float) -> Decision:
        """Allowed (a token taken and a slot held for each key that has such limits), or the
        limit with the longest wait; then nothing is taken."""
        self._sweep(now)
        decision = self.check_nowait(keys, now)
        if not decision.allowed:
            return decision
        held = []
        for scope, key, spec in unique_limits(keys):
            entry = self._entries.get((scope, key))
            if entry is None:
                entry = self._entries[(scope, key)] = _Entry()
            else:
                self._entries.move_to_end((scope, key))
            if spec.rate is not None:
                if entry.bucket is None:
                    entry.bucket = TokenBucket.full(spec.rate, spec.capacity, now)
                elif (entry.bucket.rate, entry.bucket.capacity) != (spec.rate, spec.capacity):
                    entry.bucket.reshape(spec.rate, spec.capacity)
                entry.bucket.take(now)
            if spec.max_concurrent is not None:
                entry.in_flight += 1
                held.append((scope, key))
        self._enforce_cap()
        if not held:
            return ALLOWED
        lease = Lease(f"m{next(self._lease_ids)}", tuple(held))
        self._live.add(lease.id)
        return Decision(True, lease=lease)

    def release(self, lease: Lease | None) -> None:
        """Give back the slots of ``lease`` (None: nothing was held); a second call does nothing."""
        if lease is None or lease.id not in self._live:
            return
        self._live.discard(lease.id)
        for scope, key in lease.keys:
            entry = self._entries.get((scope, key))
            if entry is not None and entry.in_flight > 0:
                entry.in_flight -= 1

    def _sweep(self, now: float) -> None:
        for _ in range(min(self.SWEEP, len(self._entries))):
            key, entry = next(iter(self._entries.items()))
            if entry.idle(now):
                del self._entries[key]
            elif entry.in_flight:
                self._entries.move_to_end(key)  # in use: not a candidate until it is released
            else:
                return  # refilling: later entries were used more recently

    def _enforce_cap(self) -> None:
        # Entries holding slots are bounded by the requests in flight (admission.GlobalGate), so this ends.
        looked = 0
        while len(self._entries) > self.max_keys and looked < len(self._entries):
            key, entry = next(iter(self._entries.items()))
            if entry.in_flight:
                self._entries.move_to_end(key)
                looked += 1
            else:
                del self._entries[key]
                self.evictions += 1


def unique_limits(keys: Sequence[LimitKey | tuple[str, str, LimitSpec]]) -> Iterator[tuple[str, str, LimitSpec]]:
    seen = set()
    for scope, key, spec in keys:
        if (scope, key) not in seen and not spec.unlimited:
            seen.add((scope, key))
            yield scope, key, spec


# --- single-use signatures ------------------------------------------------------------------------


class SeenSignatures:
    """Signatures of single-use URLs already used, each remembered until its URL expires.

    ``expires_at`` must be the last moment the URL is still accepted (its expiry plus the
    allowed clock skew), so a signature is never forgotten while it could still verify.
    Memory is bounded by ``max_entries``: when that many unexpired signatures are remembered,
    new single-use requests are refused with 503 rather than forgetting one (which would let
    it be replayed).
    """

    def __init__(self, max_entries: int = 100_000):
        self.max_entries = max_entries
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def check_and_add(self, signature: str, expires_at: float, now: float) -> bool:
        """True the first time ``signature`` is seen (and it is remembered), False afterwards."""
        self._expire(now)
        if signature in self._expiry:
            return False
        if expires_at <= now:
            return True  # already expired: the validity check refuses it; nothing to remember
        if len(self._expiry) >= self.max_entries:
            retry = max(1, math.ceil(self._heap[0][0] - now))
            raise Overloaded(
                f"too many single-use URLs are live ({len(self._expiry)}); retry after {retry} s",
                code="single_use_capacity",
                retry_after=retry,
            )
        self._expiry[signature] = expires_at
        heapq.heappush(self._heap, (expires_at, signature))
        return True

    def _expire(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expires_at, signature = heapq.heappop(self._heap)
            if self._expiry.get(signature) == expires_at:
                del self._expiry[signature]


def replay_refusal() -> Forbidden:
    """The 403 for a second use of a single-use URL."""
    return Forbidden("this signed URL is single-use and has already been used", code="already_used")
