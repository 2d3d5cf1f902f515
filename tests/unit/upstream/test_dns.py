"""proxy.upstream.dns: host names resolved once per TTL, look-ups shared, failures never kept."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from proxy.upstream.dns import DNSCache

ANSWER = ["192.0.2.7", "192.0.2.8"]


class Resolver:
    """A resolver that counts its look-ups and answers when released (or at once)."""

    def __init__(self, answer: list[str] = ANSWER, *, hold: bool = False):
        self.answer = answer
        self.calls: list[tuple[str, int]] = []
        self.release = trio.Event()
        if not hold:
            self.release.set()
        self.error: OSError | None = None

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return list(self.answer)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_an_answer_is_kept_for_the_ttl_and_then_looked_up_again():
    resolver, clock = Resolver(), Clock()
    dns = DNSCache(30, resolver, clock=clock)
    assert await dns("api.example.com", 443) == ANSWER
    clock.now += 29.9
    assert await dns("API.example.com", 443) == ANSWER  # names are case-insensitive
    assert len(resolver.calls) == 1 and (dns.lookups, dns.hits) == (1, 1)
    clock.now += 0.2
    resolver.answer = ["192.0.2.9"]
    assert await dns("api.example.com", 443) == ["192.0.2.9"]
    assert len(resolver.calls) == 2


async def test_each_port_is_its_own_entry_and_a_ttl_of_zero_keeps_nothing():
    resolver = Resolver()
    dns = DNSCache(30, resolver, clock=Clock())
    await dns("api.example.com", 443)
    await dns("api.example.com", 8443)
    assert len(resolver.calls) == 2
    off = DNSCache(0, resolver)
    await off("api.example.com", 443)
    await off("api.example.com", 443)
    assert len(resolver.calls) == 4


async def test_concurrent_look_ups_of_one_name_share_one():
    resolver = Resolver(hold=True)
    dns = DNSCache(30, resolver)
    answers: list[list[str]] = []

    async def ask() -> None:
        answers.append(await dns("api.example.com", 443))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert len(resolver.calls) == 1
        resolver.release.set()
    assert answers == [ANSWER] * 5 and len(resolver.calls) == 1


async def test_a_failed_look_up_is_never_kept_and_each_waiter_asks_for_itself():
    resolver = Resolver(hold=True)
    resolver.error = OSError(-2, "Name or service not known")
    dns = DNSCache(30, resolver)
    errors: list[OSError] = []

    async def ask() -> None:
        try:
            await dns("nowhere.example", 443)
        except OSError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        resolver.release.set()
    assert len(errors) == 3
    # The first failure is not shared: the two that waited each looked the name up themselves.
    assert len(resolver.calls) == 3
    resolver.error = None
    assert await dns("nowhere.example", 443) == ANSWER
    assert len(resolver.calls) == 4


async def test_a_cancelled_look_up_leaves_its_waiters_to_look_up_themselves():
    resolver = Resolver(hold=True)
    dns = DNSCache(30, resolver)
    got: list[list[str]] = []
    first = trio.CancelScope()

    async def leader() -> None:
        with first:
            await dns("api.example.com", 443)

    async def waiter() -> None:
        got.append(await dns("api.example.com", 443))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leader)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert len(resolver.calls) == 1
        first.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert len(resolver.calls) == 2  # the waiter's own look-up, not a hang
        resolver.release.set()
    assert got == [ANSWER]


async def test_forget_drops_the_answer_and_the_oldest_name_goes_first():
    resolver = Resolver()
    dns = DNSCache(30, resolver, max_names=2, clock=Clock())
    await dns("a.example", 443)
    dns.forget("A.example", 443)
    await dns("a.example", 443)
    assert len(resolver.calls) == 2
    await dns("b.example", 443)
    await dns("c.example", 443)  # a.example goes
    await dns("b.example", 443)
    await dns("c.example", 443)
    assert len(resolver.calls) == 4
    await dns("a.example", 443)
    assert len(resolver.calls) == 5


@pytest.mark.parametrize("answer", [[], ["192.0.2.1"]])
async def test_an_empty_answer_is_not_kept(answer):
    resolver = Resolver(answer)
    dns = DNSCache(30, resolver, clock=Clock())
    assert await dns("a.example", 443) == answer
    await dns("a.example", 443)
    assert len(resolver.calls) == (2 if not answer else 1)


async def test_a_reloaded_ttl_applies_and_drops_what_was_kept():
    from dataclasses import replace

    from proxy.config import ServerConfig
    from proxy.upstream.client import UpstreamClient

    resolver = Resolver()
    client = UpstreamClient(ServerConfig(), resolver=resolver)
    assert client.dns.ttl == 30
    await client.dns("api.example.com", 443)
    client.apply(replace(ServerConfig(), upstream_dns_ttl=5))
    assert client.dns.ttl == 5
    await client.dns("api.example.com", 443)
    assert len(resolver.calls) == 2  # looked up again under the new TTL
    client.apply(replace(ServerConfig(), upstream_dns_ttl=5))
    await client.dns("api.example.com", 443)
    assert len(resolver.calls) == 2  # an unchanged value keeps the answer
