"""Upstream host names resolved once per ``upstream_dns_ttl``, not once per connection.

Every real LLM API is a host name, and a parked stream holds its connection, so each new stream
opens one: resolving it each time put ``getaddrinfo`` in a worker thread for every stream (about
176 µs of CPU for ``localhost``, more than the rest of the connect) and sent a ramp of thousands
of streams through trio's thread limiter. Answers are kept for the TTL (the system resolver does
not give the record's own); concurrent look-ups of one name share one; a failed look-up is never
kept, and a name whose every kept address refused the connection is looked up afresh next time.
The address check (:mod:`proxy.upstream.ssrf`) still runs on every connect, on whatever the
answer is, so a kept answer can never reach an address the policy refuses.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from .ssrf import Resolver, resolve

MAX_NAMES = 1024  # names kept at once (the oldest goes first); the upstreams of a deployment are few


class _Lookup:
    """One look-up in flight, which others asking for the same name wait for."""

    __slots__ = ("addresses", "done")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.addresses: list[str] | None = None  # None: it failed or was cancelled: ask again


class DNSCache:
    """A :data:`~proxy.upstream.ssrf.Resolver` that keeps answers ``ttl`` seconds (0: never)."""

    def __init__(
        self,
        ttl: float,
        resolver: Resolver = resolve,
        *,
        max_names: int = MAX_NAMES,
        clock: Callable[[], float] = trio.current_time,
    ):
        self.ttl = ttl
        self._resolve = resolver
        self._max = max_names
        self._clock = clock
        self._kept: dict[tuple[str, int], tuple[float, list[str]]] = {}  # (name, port) -> (until, addresses)
        self._pending: dict[tuple[str, int], _Lookup] = {}
        self.hits = 0
        self.lookups = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        if self.ttl <= 0:
            self.lookups += 1
            return await self._resolve(host, port)
        key = (host.lower(), port)
        while True:
            kept = self._kept.get(key)
            if kept is not None and kept[0] > self._clock():
                self.hits += 1
                return kept[1]
            pending = self._pending.get(key)
            if pending is None:
                return await self._look_up(key, host, port)
            await pending.done.wait()
            if pending.addresses is not None:
                self.hits += 1
                return pending.addresses
            # The look-up we waited for failed or was cancelled: ours raises its own error.
            if key not in self._pending:
                return await self._look_up(key, host, port)

    async def _look_up(self, key: tuple[str, int], host: str, port: int) -> list[str]:
        lookup = self._pending[key] = _Lookup()
        self.lookups += 1
        try:
            addresses = await self._resolve(host, port)
            if addresses:
                if key not in self._kept and len(self._kept) >= self._max:
                    del self._kept[next(iter(self._kept))]
                self._kept[key] = (self._clock() + self.ttl, addresses)  # an infinite TTL stays infinite
                lookup.addresses = addresses
            return addresses
        finally:
            del self._pending[key]
            lookup.done.set()

    def forget(self, host: str, port: int) -> None:
        """Drop the kept answer for ``host``: none of its addresses took the connection."""
        self._kept.pop((host.lower(), port), None)

    def clear(self) -> None:
        self._kept.clear()
