"""Budgets in Redis, exact across every Parkway process that shares it (coredis on Trio).

Per budget window three keys: a hash (``spent``, ``held``), a sorted set of hold ids scored by
their lease deadline, and a hash of each hold's amount. One Lua script admits (sweeps expired
holds, checks ``spent + held + hold <= limit`` for every budget, then holds in all or none),
one settles (drops the hold, adds the charge). Both read Redis's own clock for leases, so
machines whose clocks differ agree on them. A live process pushes its holds' deadlines every
``lease_ttl / 3``; a process that died stops, and its holds are swept ``lease_ttl`` later.

Windows are chosen by the caller (the UTC window of its clock holds the key's name), and every
key expires an hour after its window ends. Redis failures follow ``failure_policy`` as limits do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import structlog
import trio

from .budget import Applied, Level, Reservation, Settlement
from .limiter import storage_key
from .outage import unavailable
from .redis import LeasedRedisStore, _Unavailable

log = structlog.get_logger("parkway.budget")
T = TypeVar("T")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function sweep(totals, holds, amounts)
  local expired = redis.call('ZRANGEBYSCORE', holds, '-inf', now)
  if #expired > 0 then
    local freed = 0
    for _, id in ipairs(expired) do
      freed = freed + (tonumber(redis.call('HGET', amounts, id)) or 0)
      redis.call('HDEL', amounts, id)
    end
    redis.call('ZREMRANGEBYSCORE', holds, '-inf', now)
    redis.call('HINCRBY', totals, 'held', -freed)
  end
end
"""

# KEYS: per budget i, KEYS[3i-2] totals, KEYS[3i-1] holds (sorted set), KEYS[3i] amounts.
# ARGV: hold id, lease ttl (ms), then per budget: limit, hold, expire-at (UNIX ms).
# Returns {1, spent1, held1, ...} (this hold included) or {0, i, spent_i, held_i}.
RESERVE = (
    _NOW
    + """
local ttl = tonumber(ARGV[2])
local n = #KEYS / 3
local levels = {}
for i = 1, n do
  sweep(KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i])
  local v = redis.call('HMGET', KEYS[3 * i - 2], 'spent', 'held')
  local spent, held = tonumber(v[1]) or 0, tonumber(v[2]) or 0
  if spent + held + tonumber(ARGV[3 * i + 1]) > tonumber(ARGV[3 * i]) then
    return {0, i, spent, held}
  end
  levels[i] = {spent, held}
end
local out = {1}
for i = 1, n do
  local hold = tonumber(ARGV[3 * i + 1])
  redis.call('ZADD', KEYS[3 * i - 1], now + ttl, ARGV[1])
  redis.call('HSET', KEYS[3 * i], ARGV[1], ARGV[3 * i + 1])
  redis.call('HINCRBY', KEYS[3 * i - 2], 'held', ARGV[3 * i + 1])
  for k = 3 * i - 2, 3 * i do
    redis.call('PEXPIREAT', KEYS[k], ARGV[3 * i + 2])
  end
  out[#out + 1] = levels[i][1]
  out[#out + 1] = levels[i][2] + hold
end
return out
"""
)

# KEYS as for RESERVE; ARGV: hold id, then per budget: charge, expire-at (UNIX ms).
# A hold already swept (its lease ran out) is not there to drop; the charge is added anyway.
SETTLE = """
local n = #KEYS / 3
for i = 1, n do
  local hold = tonumber(redis.call('HGET', KEYS[3 * i], ARGV[1]))
  if hold then
    redis.call('HDEL', KEYS[3 * i], ARGV[1])
    redis.call('ZREM', KEYS[3 * i - 1], ARGV[1])
    redis.call('HINCRBY', KEYS[3 * i - 2], 'held', -hold)
  end
  redis.call('HINCRBY', KEYS[3 * i - 2], 'spent', ARGV[2 * i])
  redis.call('PEXPIREAT', KEYS[3 * i - 2], ARGV[2 * i + 1])
end
return 1
"""

# KEYS as for RESERVE; returns {spent1, held1, ...} with expired holds swept first.
LEVELS = (
    _NOW
    + """
local out = {}
for i = 1, #KEYS / 3 do
  sweep(KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i])
  local v = redis.call('HMGET', KEYS[3 * i - 2], 'spent', 'held')
  out[#out + 1] = tonumber(v[1]) or 0
  out[#out + 1] = tonumber(v[2]) or 0
end
return out
"""
)

# KEYS: hold sets; ARGV[1]: ttl (ms); ARGV[i + 1]: the hold id in KEYS[i]. XX: a settled hold stays gone.
REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
end
return 1
"""


class RedisBudgets(LeasedRedisStore):
    """The :class:`~proxy.limits.budget_state.BudgetStore` over Redis."""

    REFRESH_SCRIPT = REFRESH
    UNAVAILABLE_EVENT = "budget_state_unavailable"
    RECOVERED_EVENT = "budget_state_recovered"
    log = log  # its holds' outages are the budgets' log lines

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "parkway:",
        failure_policy: str = "open",
        timeout: float = 0.25,
        retry_interval: float = 1.0,
        lease_ttl: float = 60.0,
    ):
        super().__init__(
            url,
            key_prefix=key_prefix,
            failure_policy=failure_policy,
            timeout=timeout,
            retry_interval=retry_interval,
            lease_ttl=lease_ttl,
        )
        self._reserve = self._client.register_script(RESERVE)
        self._settle = self._client.register_script(SETTLE)
        self._levels = self._client.register_script(LEVELS)
        self.ledger = f"redis:{self._location}:{key_prefix}"

    def _keys(self, key: str) -> list[str]:
        base = f"{self.key_prefix}budget:{storage_key('b', key)}"
        return [base, f"{base}:holds", f"{base}:amounts"]

    async def reserve(self, budgets: Sequence[Applied], hold_id: str) -> Reservation:
        if not budgets:
            return Reservation(True)
        keys: list[str] = []
        args: list[str | int] = [hold_id, math.ceil(self.lease_ttl * 1000)]
        for b in budgets:
            keys += self._keys(b.key)
            args += [b.spec.limit, b.hold, math.ceil(b.expires_at * 1000)]
        try:
            reply: list[Any] = await self._call(lambda: self._reserve(keys=keys, args=args))
        except _Unavailable:
            if self.failure_policy == "closed":
                raise unavailable(self.retry_interval) from None
            return Reservation(True, enforced=False)
        if int(reply[0]) != 1:
            return Reservation(False, (Level(int(reply[2]), int(reply[3])),), refused=int(reply[1]) - 1)
        self._leases[hold_id] = tuple(self._keys(b.key)[1] for b in budgets)
        levels = tuple(Level(int(reply[1 + 2 * i]), int(reply[2 + 2 * i])) for i in range(len(budgets)))
        return Reservation(True, levels)

    async def settle(self, budgets: Sequence[Applied], hold_id: str, amounts: Sequence[int]) -> Settlement:
        self._leases.pop(hold_id, None)
        if not budgets:
            return Settlement.RECORDED
        keys: list[str] = []
        args: list[str | int] = [hold_id]
        for b, charge in zip(budgets, amounts, strict=True):
            keys += self._keys(b.key)
            args += [charge, math.ceil(b.expires_at * 1000)]
        with trio.CancelScope(shield=True):  # a charge must be recorded even when the request was cancelled
            try:
                await self._call(lambda: self._settle(keys=keys, args=args))
            except _Unavailable as exc:
                # A script that may have reached a stalled Redis may still run when it answers.
                return Settlement.UNKNOWN if exc.may_have_run else Settlement.NOT_RECORDED
        return Settlement.RECORDED

    async def levels(self, keys: Sequence[str]) -> list[Level]:
        redis_keys = [k for key in keys for k in self._keys(key)]
        try:
            reply: list[Any] = await self._call(lambda: self._levels(keys=redis_keys, args=[]))
        except _Unavailable:
            raise unavailable(self.retry_interval) from None
        return [Level(int(reply[2 * i]), int(reply[2 * i + 1])) for i in range(len(keys))]
