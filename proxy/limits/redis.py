"""Limits and single-use signatures in Redis, shared by every Parkway process (coredis on Trio).

Each decision is one atomic Lua script, so processes never race:

* rate: a token bucket per key (hash ``tokens``/``ts``), refilled from Redis's own clock
  (``TIME``), so machines whose clocks differ still agree; it expires once it would be full;
* concurrency: a sorted set per key of lease ids scored by their expiry. A live process
  refreshes its leases every ``lease_ttl / 3``; a crashed one's leases expire after
  ``lease_ttl``, so its slots come back on their own;
* single use: ``SET key 1 NX PX ttl``, the signature remembered exactly until its URL expires.

All keys of one request are checked before any is changed, as in :class:`~proxy.limits.limiter.Limiter`.
Every Redis operation is bounded by ``timeout``. When Redis fails, :class:`~proxy.limits.outage.Outage`
records it, one log line says so, and ``failure_policy`` decides: "open" allows (no limits,
no single-use check), "closed" refuses with 503. One attempt per ``retry_interval`` probes
Redis; the first success logs the recovery. Only standalone Redis (or a primary) is supported:
the scripts touch several keys, which Redis Cluster would need in one hash slot.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from typing import Any, Self, TypeVar

import coredis
import coredis.exceptions
import structlog
import trio

from .._redis import REDIS_FAILURES, RedisClientOwner
from ..config import FAILURE_POLICIES
from .limiter import ALLOWED, CONCURRENCY, RATE, Decision, Lease, LimitKey, refused, storage_key, unique_limits
from .outage import Outage, unavailable

log = structlog.get_logger("parkway.state")
T = TypeVar("T")

# KEYS: per limit i, KEYS[2i-1] its bucket (hash) and KEYS[2i] its leases (sorted set).
# ARGV: lease id, lease ttl (ms), concurrency retry (ms), then per limit: rate (tokens/ms,
# 0 = none), capacity, max concurrent (0 = none).
# Returns {1} when allowed, else {0, index of the limit, 'rate' | 'concurrency', wait in ms}.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local conc_wait = tonumber(ARGV[3])
local n = #KEYS / 2
local levels = {}
local worst, worst_kind, worst_wait = 0, '', -1
for i = 1, n do
  local rate = tonumber(ARGV[3 + 3 * i - 2])
  local cap = tonumber(ARGV[3 + 3 * i - 1])
  local maxc = tonumber(ARGV[3 + 3 * i])
  if maxc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2 * i], '-inf', now)
    if redis.call('ZCARD', KEYS[2 * i]) >= maxc and conc_wait > worst_wait then
      worst, worst_kind, worst_wait = i, 'concurrency', conc_wait
    end
  end
  if rate > 0 then
    local b = redis.call('HMGET', KEYS[2 * i - 1], 'tokens', 'ts')
    local tokens = tonumber(b[1]) or cap
    local ts = tonumber(b[2]) or now
    tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
    levels[i] = tokens
    if tokens < 1 then
      local wait = math.ceil((1 - tokens) / rate)
      if wait > worst_wait then
        worst, worst_kind, worst_wait = i, 'rate', wait
      end
    end
  end
end
if worst > 0 then
  return {0, worst, worst_kind, worst_wait}
end
for i = 1, n do
  local rate = tonumber(ARGV[3 + 3 * i - 2])
  local cap = tonumber(ARGV[3 + 3 * i - 1])
  local maxc = tonumber(ARGV[3 + 3 * i])
  if rate > 0 then
    redis.call('HSET', KEYS[2 * i - 1], 'tokens', tostring(levels[i] - 1), 'ts', now)
    redis.call('PEXPIRE', KEYS[2 * i - 1], math.ceil(cap / rate) + 1000)
  end
  if maxc > 0 then
    redis.call('ZADD', KEYS[2 * i], now + ttl, ARGV[1])
    redis.call('PEXPIRE', KEYS[2 * i], ttl + 1000)
  end
end
return {1}
"""

# KEYS: lease sets; ARGV[1]: the lease id.
RELEASE = """
for i = 1, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[1])
end
return 1
"""

# KEYS: lease sets; ARGV[1]: ttl (ms); ARGV[i + 1]: the lease id held in KEYS[i].
# XX: a lease released (or lost with a restarted Redis) meanwhile is not brought back.
REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', now + ttl, ARGV[i + 1]) > 0 then
    redis.call('PEXPIRE', KEYS[i], ttl + 1000)
  end
end
return 1
"""

REFRESH_BATCH = 500  # lease keys per refresh script call


class _Unavailable(Exception):
    """Redis could not be used for this operation; the failure policy applies.

    ``may_have_run``: the operation may have reached Redis (it timed out, or the connection broke
    after it could have been written), so Redis may still run it once it answers. False only
    when it surely was not sent: the outage policy skipped it, or the connection was refused."""

    def __init__(self, may_have_run: bool = False):
        super().__init__()
        self.may_have_run = may_have_run


def _never_sent(exc: BaseException) -> bool:
    """Whether ``exc`` proves the command never left this process: a refused connect (coredis
    wraps it in its ConnectionError). Anything else may have been written: conservative."""
    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain is short; bounded all the same
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class LeasedRedisStore(RedisClientOwner):
    """A Redis store whose holds carry leases this process renews (limits' concurrency slots,
    budgets' holds): every operation bounded by ``timeout`` and tracked by an :class:`Outage`,
    and a task that pushes each live lease ``lease_ttl`` into the future every ``lease_ttl / 3``.

    A subclass gives its own ``REFRESH_SCRIPT`` (KEYS: sorted sets; ARGV: the ttl in ms, then one
    lease id per key), its logger and its outage log events, and keeps ``_leases`` (lease id ->
    its sorted-set keys) up to date."""

    REFRESH_SCRIPT: str
    UNAVAILABLE_EVENT = "state_unavailable"
    RECOVERED_EVENT = "state_recovered"
    log: Any = log

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str,
        failure_policy: str,
        timeout: float,
        retry_interval: float,
        lease_ttl: float,
    ):
        self.key_prefix = key_prefix
        self.failure_policy = failure_policy
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.lease_ttl = lease_ttl
        self.outage = Outage(retry_interval)
        super().__init__(url, timeout=timeout)
        self._refresh = self._client.register_script(self.REFRESH_SCRIPT)
        self._leases: dict[str, tuple[str, ...]] = {}  # lease id -> its sorted-set keys, for refreshing

    async def __aenter__(self) -> Self:
        """The client connected, and the task that keeps this process's leases alive."""
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self._client)
            nursery = await stack.enter_async_context(trio.open_nursery())
            nursery.start_soon(self._refresh_leases)
            stack.callback(nursery.cancel_scope.cancel)
            self._stack = stack.pop_all()
        return self

    def _outage_fields(self) -> dict[str, Any]:
        """More fields of the outage log lines."""
        return {}

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation within ``timeout``, tracking outages; raise _Unavailable on failure."""
        if not self.outage.claim_attempt(trio.current_time()):
            raise _Unavailable
        try:
            with trio.fail_after(self.timeout):
                result = await operation()
        except REDIS_FAILURES as exc:
            if self.outage.failed(trio.current_time()):
                self.log.error(
                    self.UNAVAILABLE_EVENT,
                    **self._outage_fields(),
                    redis=self._location,
                    error=str(exc) or type(exc).__name__,
                    failure_policy=self.failure_policy,
                    retry_interval=self.retry_interval,
                )
            raise _Unavailable(may_have_run=not _never_sent(exc)) from exc
        length = self.outage.succeeded(trio.current_time())
        if length is not None:
            self.log.warning(
                self.RECOVERED_EVENT, **self._outage_fields(), redis=self._location, outage_s=round(length, 3)
            )
        return result

    async def _refresh_leases(self) -> None:
        while True:
            await trio.sleep(self.lease_ttl / 3)
            await self.refresh_now()

    async def refresh_now(self) -> None:
        """Push the expiry of every lease this process holds ``lease_ttl`` into the future."""
        pairs = [(key, lease_id) for lease_id, keys in list(self._leases.items()) for key in keys]
        ttl_ms = math.ceil(self.lease_ttl * 1000)
        for start in range(0, len(pairs), REFRESH_BATCH):
            batch = pairs[start : start + REFRESH_BATCH]
            refresh = partial(self._refresh, keys=[k for k, _ in batch], args=[ttl_ms, *(i for _, i in batch)])
            try:
                await self._call(refresh)
            except _Unavailable:
                return


class RedisState(LeasedRedisStore):
    """The :class:`~proxy.limits.state.StateBackend` over Redis; ``async with RedisState(url) as state``."""

    REFRESH_SCRIPT = REFRESH

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "parkway:",
        failure_policy: str = "open",
        timeout: float = 0.25,
        retry_interval: float = 1.0,
        lease_ttl: float = 60.0,
        concurrency_retry_after: float = 1.0,
    ):
        if failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"failure_policy must be one of {', '.join(FAILURE_POLICIES)}")
        self.concurrency_retry_after = concurrency_retry_after
        super().__init__(
            url,
            key_prefix=key_prefix,
            failure_policy=failure_policy,
            timeout=timeout,
            retry_interval=retry_interval,
            lease_ttl=lease_ttl,
        )
        self._acquire = self._client.register_script(ACQUIRE)
        self._release = self._client.register_script(RELEASE)

    def healthy(self) -> bool:
        return not self.outage.down

    async def probe(self) -> bool:
        try:
            await self._call(self._client.ping)
        except _Unavailable:
            pass
        return self.healthy()

    # --- the protocol -----------------------------------------------------------------------

    async def acquire(self, keys: Sequence[LimitKey], now: float) -> Decision:
        limits = list(unique_limits(keys))
        if not limits:
            return ALLOWED
        lease_id = secrets.token_hex(12)
        redis_keys: list[str] = []
        ttl_ms, retry_ms = math.ceil(self.lease_ttl * 1000), math.ceil(self.concurrency_retry_after * 1000)
        args: list[str | int] = [lease_id, ttl_ms, retry_ms]
        for scope, key, spec in limits:
            redis_keys += [self._bucket_key(scope, key), self._lease_key(scope, key)]
            args += [repr(spec.rate / 1000) if spec.rate else "0", repr(spec.capacity), spec.max_concurrent or 0]
        try:
            reply: list[Any] = await self._call(lambda: self._acquire(keys=redis_keys, args=args))
        except _Unavailable:
            if self.failure_policy == "closed":
                raise unavailable(self.retry_interval) from None
            return ALLOWED
        if int(reply[0]) != 1:
            scope, key, spec = limits[int(reply[1]) - 1]
            kind = CONCURRENCY if _text(reply[2]) == CONCURRENCY else RATE
            return refused(scope, kind, key, spec, int(reply[3]) / 1000)
        held = tuple((scope, key) for scope, key, spec in limits if spec.max_concurrent is not None)
        if not held:
            return ALLOWED
        self._leases[lease_id] = tuple(self._lease_key(scope, key) for scope, key in held)
        return Decision(True, lease=Lease(lease_id, held))

    async def release(self, lease: Lease | None) -> None:
        if lease is None:
            return
        lease_keys = self._leases.pop(lease.id, None)
        if not lease_keys:
            return
        # Cleanup that must happen even when the request was cancelled; bounded by timeout.
        # If Redis is down the lease simply expires (it is no longer refreshed).
        with trio.CancelScope(shield=True):
            try:
                await self._call(lambda: self._release(keys=list(lease_keys), args=[lease.id]))
            except _Unavailable:
                pass

    async def check_and_add_signature(self, signature: str, expires_at: float, now: float) -> bool:
        ttl_ms = math.ceil((expires_at - now) * 1000)
        if ttl_ms <= 0:
            return True  # already expired: the validity check refuses it; nothing to remember
        key = f"{self.key_prefix}su:{signature}"
        try:
            return bool(
                await self._call(lambda: self._client.set(key, b"1", condition=coredis.PureToken.NX, px=ttl_ms))
            )
        except _Unavailable:
            if self.failure_policy == "closed":
                raise unavailable(self.retry_interval) from None
            return True

    # --- plumbing ---------------------------------------------------------------------------

    def _bucket_key(self, scope: str, key: str) -> str:
        return f"{self.key_prefix}rate:{storage_key(scope, key)}"

    def _lease_key(self, scope: str, key: str) -> str:
        return f"{self.key_prefix}conc:{storage_key(scope, key)}"

    def _outage_fields(self) -> dict[str, Any]:
        return {"backend": "redis"}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
