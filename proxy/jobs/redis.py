"""The shared job store: Redis (coredis on Trio), for several Parkway processes or machines.

Each job is a hash ``<prefix>job:<id>`` holding its record (``r``) and a version (``v``). Sorted
sets index them: ``jobs:queued`` (by creation: FIFO), ``jobs:running`` (by lease expiry),
``jobs:deliveries`` (by next attempt) and ``jobs:done:<status>`` (by expiry, +inf while a delivery
may still run). A change is a compare-and-set: read the record and its version, apply the pure
state change of :mod:`proxy.jobs.model`, then one Lua script writes it and moves the id between the
sets only if the version is still the one read. Two runners racing for a job: one wins, the
other picks again. A runner that dies holding a job stops renewing its lease; once the lease
ends the job's score in ``jobs:running`` is in the past and the next claim, by any process,
takes it. Leases compare the runners' clocks, so keep the machines' clocks in sync (NTP).

Only standalone Redis (or a primary): the script touches several keys.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Set
from dataclasses import replace
from typing import Any, TypeVar

import coredis
import coredis.exceptions
import trio

from .._redis import REDIS_FAILURES, RedisClientOwner
from ..errors import Overloaded
from . import model as jobs
from .model import Job
from .store import (
    Cancellation,
    Index,
    QueueFull,
    StoreStats,
    cancellation,
    credential_queue_full,
    expired,
    index_of,
    job_from_json,
    job_to_json,
)

T = TypeVar("T")
CAS_ATTEMPTS = 8  # a change lost to another runner is recomputed this many times
PURGE_BATCH = 500

# KEYS: job hash, queued, running, deliveries, done:completed, done:failed, done:cancelled,
#       the job's credential's queue, the set of credentials that have a queue.
# ARGV: expected version ("" = must not exist), record, status, queued_at, lease_until,
#       delivery_at, done score, id, max queued ("" = no check), expiry in UNIX ms ("" = none),
#       max queued of the credential ("" = no check), the credential. Empty score = not in that set.
# Returns 1 written, 0 version changed (or gone), -1 already exists, -2 queue full, -3 the
# credential's queue full.
CAS = """
local v = redis.call('HGET', KEYS[1], 'v')
if ARGV[1] == '' then
  if v then return -1 end
elseif v ~= ARGV[1] then
  return 0
end
if ARGV[9] ~= '' and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[9]) then return -2 end
if ARGV[11] ~= '' and redis.call('ZCARD', KEYS[8]) >= tonumber(ARGV[11]) then return -3 end
redis.call('HSET', KEYS[1], 'r', ARGV[2], 'v', (tonumber(v) or 0) + 1)
local id = ARGV[8]
for i = 2, 8 do redis.call('ZREM', KEYS[i], id) end
local function put(key, score)
  if score ~= '' then redis.call('ZADD', key, score, id) end
end
put(KEYS[2], ARGV[4])
put(KEYS[8], ARGV[4])
if ARGV[4] ~= '' then redis.call('SADD', KEYS[9], ARGV[12]) end
put(KEYS[3], ARGV[5])
put(KEYS[4], ARGV[6])
local done = {completed = KEYS[5], failed = KEYS[6], cancelled = KEYS[7]}
if done[ARGV[3]] then put(done[ARGV[3]], ARGV[7]) end
-- A job past its result TTL goes by itself even if no purge runs; until then it is kept.
if ARGV[10] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[10]) else redis.call('PERSIST', KEYS[1]) end
return 1
"""


def _score(value: float | None) -> str:
    return "" if value is None else repr(value)


class RedisJobStore(RedisClientOwner):
    """The :class:`~proxy.jobs.store.JobStore` in Redis; ``async with RedisJobStore(url) as store``.

    A Redis failure raises :class:`~proxy.errors.Overloaded` (503 for a request; the runner
    logs it and tries again on its next round): a job is never accepted without being stored.
    """

    def __init__(self, url: str, *, key_prefix: str = "parkway:", timeout: float = 2.0):
        self.prefix = key_prefix
        self.timeout = timeout
        super().__init__(url, timeout=timeout)
        self._cas = self._client.register_script(CAS)
        self.queued, self.running, self.deliveries = (
            f"{key_prefix}jobs:{n}" for n in ("queued", "running", "deliveries")
        )
        self.done = {s: f"{key_prefix}jobs:done:{s}" for s in (jobs.COMPLETED, jobs.FAILED, jobs.CANCELLED)}
        self.credentials = f"{key_prefix}jobs:credentials"  # those that have a queue (never many)

    def _credential_queue(self, credential: str) -> str:
        return f"{self.prefix}jobs:queued:credential:{credential}"

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    async def _call(self, operation: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """``await operation(*args, **kwargs)`` within ``timeout``; a failure is a 503."""
        try:
            with trio.fail_after(self.timeout):
                return await operation(*args, **kwargs)
        except REDIS_FAILURES as exc:
            raise Overloaded(
                f"the job store (Redis) is unreachable: {type(exc).__name__}",
                code="job_store_unavailable",
                retry_after=1,
            ) from None

    async def _load(self, job_id: str) -> tuple[Job, str] | None:
        record, version = await self._call(self._client.hmget, self._key(job_id), ["r", "v"])
        if record is None or version is None:
            return None
        try:
            return job_from_json(record), version.decode()
        except ValueError:
            return None

    async def _write(
        self, job: Job, version: str, *, max_queued: int | None = None, max_queued_credential: int | None = None
    ) -> int:
        i: Index = index_of(job)
        done = "" if not job.terminal else ("+inf" if i.expires_at is None else repr(i.expires_at))
        keys = [self._key(job.id), self.queued, self.running, self.deliveries, *self.done.values(),
                self._credential_queue(job.credential), self.credentials]  # fmt: skip
        args: list[str | bytes] = [
            version, job_to_json(job), job.status, _score(i.queued_at), _score(i.lease_until),
            _score(i.delivery_at), done, job.id, "" if max_queued is None else str(max_queued),
            "" if i.expires_at is None else str(math.ceil(i.expires_at * 1000)),
            "" if max_queued_credential is None else str(max_queued_credential), job.credential,
        ]  # fmt: skip
        return int(await self._call(self._cas, keys=keys, args=args))

    async def _change(self, job_id: str, change: Callable[[Job], Job | None]) -> tuple[Job | None, bool]:
        """Apply ``change`` to the stored job by compare-and-set; (job as it is now, whether changed)."""
        for _ in range(CAS_ATTEMPTS):
            loaded = await self._load(job_id)
            if loaded is None:
                return None, False
            job, version = loaded
            new = change(job)
            if new is None:
                return job, False
            if await self._write(new, version) == 1:
                return new, True
        return None, False

    # --- the protocol ---------------------------------------------------------------------------

    async def add(self, job: Job, *, max_queued: int, max_queued_credential: int | None = None) -> None:
        written = await self._write(job, "", max_queued=max_queued, max_queued_credential=max_queued_credential)
        if written == -2:
            raise QueueFull(f"max_jobs_queued = {max_queued} jobs are queued")
        if written == -3:
            assert max_queued_credential is not None
            raise QueueFull(credential_queue_full(job.credential, max_queued_credential, max_queued_credential))
        if written != 1:
            raise RuntimeError("job id collision")  # 192 random bits: never expected

    async def get(self, job_id: str, *, now: float) -> Job | None:
        loaded = await self._load(job_id)
        return None if loaded is None or expired(loaded[0], now) else loaded[0]

    async def _candidates(self, now: float, skip_credentials: Set[str], skip_ids: Set[str]) -> list[str]:
        window = 4 + len(skip_ids)
        stale = await self._call(
            self._client.zrange, self.running, "-inf", now, sortby=coredis.PureToken.BYSCORE, offset=0, count=window
        )
        fresh: Any
        if not skip_credentials:
            fresh = await self._call(self._client.zrange, self.queued, 0, window - 1)
        else:  # the heads of the other credentials' queues, oldest first
            members = await self._call(self._client.smembers, self.credentials)
            heads: list[tuple[float, bytes]] = []
            for member in members:
                credential = member.decode() if isinstance(member, bytes) else str(member)
                if credential not in skip_credentials:
                    queue = self._credential_queue(credential)
                    found: Any = await self._call(self._client.zrange, queue, 0, window - 1, withscores=True)
                    heads += [(float(score), job_id) for job_id, score in found]
            fresh = [job_id for _, job_id in sorted(heads)[:window]]
        ids = [m.decode() for m in (*stale, *fresh) if isinstance(m, bytes)]
        return [i for i in ids if i not in skip_ids]

    async def claim(
        self, owner: str, *, now: float, lease: float, skip_credentials: Set[str] = frozenset(),
        skip_ids: Set[str] = frozenset(),
    ) -> Job | None:  # fmt: skip
        for _ in range(CAS_ATTEMPTS):
            candidates = await self._candidates(now, skip_credentials, skip_ids)
            if not candidates:
                return None
            for job_id in candidates:

                def take(job: Job) -> Job | None:
                    runnable = job.status == jobs.QUEUED or (
                        job.status == jobs.IN_PROGRESS and (job.lease_until or 0) <= now
                    )
                    if job.credential in skip_credentials:
                        return None
                    return jobs.claimed(job, owner, now=now, lease=lease) if runnable else None

                job, changed = await self._change(job_id, take)
                if changed:
                    return job
                if job is None:  # unreadable or gone: drop it from the indexes
                    await self._call(self._unindex, job_id)
        return None

    async def _unindex(self, job_id: str) -> None:
        for key in (self.queued, self.running, self.deliveries, *self.done.values()):
            await self._client.zrem(key, [job_id])
        for member in await self._client.smembers(self.credentials):
            credential = member.decode() if isinstance(member, bytes) else str(member)
            await self._client.zrem(self._credential_queue(credential), [job_id])

    async def renew(self, job_id: str, owner: str, *, until: float) -> bool:
        def extend(job: Job) -> Job | None:
            ours = job.status == jobs.IN_PROGRESS and job.owner == owner
            return replace(job, lease_until=until) if ours else None

        return (await self._change(job_id, extend))[1]

    async def finish(self, job: Job, owner: str) -> bool:
        def write(current: Job) -> Job | None:
            return job if current.status == jobs.IN_PROGRESS and current.owner == owner else None

        return (await self._change(job.id, write))[1]

    async def cancel(self, job_id: str, *, now: float, result_ttl: float) -> Cancellation | None:
        seen: list[Job] = []

        def stop(job: Job) -> Job | None:
            seen.append(job)  # the version this attempt read; the one written if the CAS holds
            return None if job.terminal else jobs.cancelled(job, now=now, result_ttl=result_ttl)

        job, changed = await self._change(job_id, stop)
        if job is None or expired(job, now):
            return None
        # Changed: the compare-and-set wrote over exactly the version the last attempt read, so a
        # claim that got in first made this attempt fail and be recomputed from in_progress.
        return cancellation(seen[-1], job) if changed else Cancellation(job, None)

    async def claim_delivery(self, *, now: float, lease: float) -> Job | None:
        due = await self._call(
            self._client.zrange, self.deliveries, "-inf", now, sortby=coredis.PureToken.BYSCORE, offset=0, count=4
        )
        for member in due:
            job_id = member.decode() if isinstance(member, bytes) else str(member)

            def hide(job: Job) -> Job | None:
                d = job.delivery
                if d.state != jobs.PENDING or d.next_at is None or d.next_at > now:
                    return None
                return replace(job, delivery=replace(d, next_at=now + lease))

            job, changed = await self._change(job_id, hide)
            if changed and job is not None:
                # What the attempt starts from: the schedule counts from the stored state.
                return replace(job, delivery=replace(job.delivery, next_at=now))
        return None

    async def delivered(self, job: Job) -> None:
        await self._change(job.id, lambda current: job)

    async def purge(self, *, now: float) -> int:
        """Delete expired jobs and their index entries (a hash whose TTL already took it leaves
        its id in the done set until here)."""
        removed = 0
        for key in self.done.values():
            while True:
                old = await self._call(
                    self._client.zrange, key, "-inf", now, sortby=coredis.PureToken.BYSCORE, offset=0, count=PURGE_BATCH
                )
                ids = [m.decode() if isinstance(m, bytes) else str(m) for m in old]
                if not ids:
                    break
                await self._call(self._client.delete, [self._key(i) for i in ids])
                await self._call(self._client.zrem, key, ids)
                removed += len(ids)
                if len(ids) < PURGE_BATCH:
                    break
        return removed

    async def stats(self, *, now: float) -> StoreStats:
        by_status: dict[str, int] = {}
        for status, key in [(jobs.QUEUED, self.queued), (jobs.IN_PROGRESS, self.running), *self.done.items()]:
            by_status[status] = await self._call(self._client.zcard, key)
        pending = await self._call(self._client.zcard, self.deliveries)
        oldest: Any = await self._call(self._client.zrange, self.queued, 0, 0, withscores=True)
        age = max(0.0, now - float(oldest[0][1])) if oldest else 0.0
        return StoreStats(by_status, pending, age)
