"""The response cache end to end: real sockets, the in-test upstream, Parkway in this process.

Each test says what the upstream saw: a hit and a collapsed follower make no upstream request,
an answer that must not be stored makes the next identical request go upstream again.
"""

from __future__ import annotations

import gc
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from proxy.cache.policy import CacheConfig, CacheRules
from proxy.config import Config, Credential
from proxy.jobs.model import JobsConfig
from proxy.limits import LimitSpec
from support.http import Call, Reply, call, read_until_eof, request_bytes
from support.logs import watch_logs
from support.metrics import parse_metrics
from support.parkway import TEST_CREDENTIAL, Parkways, RunningParkway, make_config, redis_parkway_toml, with_jobs
from support.processes import ParkwayProcess, ProcessGroup, free_port, poll
from support.redis import RedisServer
from support.scripted import ScriptedUpstream, answer_with
from support.signing import SECRET, sign
from support.upstream import Upstream, respond_with, sse_from, sse_then
from support.websocket import RealtimeUpstream, ws_client

HANG_LIMIT = 20.0
EVENTS = [b'data: {"choices":[{"delta":{"content":"tok%d"}}]}\n\n' % i for i in range(8)] + [
    b'data: {"usage":{"prompt_tokens":11,"completion_tokens":8}}\n\n',
    b"data: [DONE]\n\n",
]
BODY = json.dumps({"model": "gpt-4o-mini", "temperature": 0, "stream": True, "messages": []}).encode()


@pytest.fixture
async def cached_parkway(
    nursery: trio.Nursery, hang_guard: None, contain_crashes: None
) -> AsyncIterator[Callable[..., Awaitable[RunningParkway]]]:
    """Factory: Parkway whose credentials are ``credentials`` and whose [cache] is ``cache``."""
    parkways = Parkways(nursery)

    async def start(credentials: tuple[Credential, ...] | None = None, **cache: Any) -> RunningParkway:
        config: Config = replace(make_config(credentials=credentials), cache=CacheConfig(**cache))
        return await parkways.start(config)

    yield start
    await parkways.drain()
    gc.collect()


def signed(base: str, proxy_url: str, **kwargs: Any) -> str:
    """Signed by Parkway's own signer: it alone signs extra parameters such as pw_cache."""
    return sign(base, proxy_url, signer="proxy.signing", **kwargs)


def stream_events(upstream: Upstream) -> Callable[[Any], Awaitable[None]]:
    """An upstream that streams EVENTS, one chunk each, the whole answer at once."""

    async def behaviour(ex: Any) -> None:
        await ex.send_head(200, [("content-type", "text/event-stream")])
        for event in EVENTS:
            await ex.send_data(event)
        await ex.send_end()

    return behaviour


def url(parkway: RunningParkway, upstream: Upstream, path: str = "/v1/chat/completions", **params: str) -> str:
    return signed(parkway.base, upstream.base + path, method="POST", params=params or None)


async def raw_exchange(parkway: RunningParkway, target: str, body: bytes = BODY, headers=()) -> tuple[bytes, bytes]:
    """One request on its own connection; the response head and its body *with its chunked framing*,
    so two answers compare equal only if they came as the same sequence of chunks."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", parkway.port)
        await stream.send_all(request_bytes("POST", target, body, headers=[("connection", "close"), *headers]))
        raw = await read_until_eof(stream)
        await stream.aclose()
    head, _, framed = raw.partition(b"\r\n\r\n")
    return head, framed


def header(head: bytes, name: str) -> str | None:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def test_a_streamed_answer_is_stored_and_replayed_as_the_same_chunks(cached_parkway, upstream) -> None:
    upstream.behaviour = stream_events(upstream)
    parkway = await cached_parkway()
    target = url(parkway, upstream, pw_cache="3600")
    with watch_logs() as logs:
        miss_head, miss_body = await raw_exchange(parkway, target)
        hit_head, hit_body = await raw_exchange(parkway, target)
        await logs.wait_for(event="request", cache="hit")
    assert len(upstream.requests) == 1
    assert header(miss_head, "cache-status") == "parkway; fwd=uri-miss; stored"
    assert header(hit_head, "cache-status").startswith("parkway; hit; ttl=")  # type: ignore[union-attr]
    assert 3590 <= int(header(hit_head, "cache-status").rsplit("=", 1)[1]) <= 3600  # type: ignore[union-attr]
    assert header(hit_head, "age") == "0" and header(miss_head, "age") is None
    assert header(hit_head, "content-type") == "text/event-stream"
    assert header(hit_head, "transfer-encoding") == "chunked"
    assert hit_body == miss_body  # chunk for chunk, framing included
    assert hit_body.count(b"\r\ndata: ") == len(EVENTS)  # not one blob: one chunk per event
    assert header(hit_head, "x-request-id") != header(miss_head, "x-request-id")  # this request's own
    assert [e["cache"] for e in logs.find(event="request")] == ["stored", "hit"]
    metrics = parse_metrics(parkway.parkway.metrics.render().decode())
    assert metrics[("parkway_cache_requests_total", frozenset({("result", "hit")}))] == 1
    assert metrics[("parkway_cache_requests_total", frozenset({("result", "miss")}))] == 1
    assert metrics[("parkway_cache_stored_total", frozenset())] == 1
    assert metrics[("parkway_cache_entries", frozenset())] == 1
    assert metrics[("parkway_cache_bytes", frozenset())] > sum(map(len, EVENTS))
    saved = frozenset({("credential", "app"), ("kind", "completion")})
    assert metrics[("parkway_cache_tokens_saved_total", saved)] == 8


async def test_fifty_identical_streams_make_one_upstream_request(cached_parkway, upstream) -> None:
    send, receive = trio.open_memory_channel[bytes](0)
    upstream.behaviour = sse_from(receive)
    parkway = await cached_parkway()
    target = url(parkway, upstream, pw_cache="60")
    calls = [await Call.open(parkway.port, "POST", target, body=BODY)]
    calls += [await Call.open(parkway.port, "POST", target, body=BODY) for _ in range(49)]
    async with send:
        await send.send(EVENTS[0])
        with trio.fail_after(5):
            for each in calls:
                await each.read_until(EVENTS[0])  # every follower has the first event ...
        for event in EVENTS[1:]:
            await send.send(event)  # ... before the leader's last one is even sent
    replies = [await each.finish() for each in calls]
    assert len(upstream.requests) == 1
    assert {r.body for r in replies} == {b"".join(EVENTS)} and all(r.complete for r in replies)
    statuses = sorted(r.headers["cache-status"] for r in replies)
    assert statuses == ["parkway; fwd=uri-miss; collapsed"] * 49 + ["parkway; fwd=uri-miss; stored"]
    hit = await call(parkway.port, "POST", target, body=BODY)
    assert hit.headers["cache-status"].startswith("parkway; hit") and len(upstream.requests) == 1


async def open_collapsed(parkway: RunningParkway, upstream: Upstream, count: int) -> tuple[list[Call], Any]:
    """``count`` identical streamed calls, the first the leader (it reached the upstream before the
    others were sent), all having received the first event; returns them and the upstream's channel."""
    send, receive = trio.open_memory_channel[bytes](0)
    upstream.behaviour = sse_from(receive)
    target = url(parkway, upstream, pw_cache="60")
    calls = [await Call.open(parkway.port, "POST", target, body=BODY)]
    await upstream.wait_for_requests(1)
    calls += [await Call.open(parkway.port, "POST", target, body=BODY) for _ in range(count - 1)]
    await send.send(EVENTS[0])
    for each in calls:
        await each.read_until(EVENTS[0])
    return calls, send


async def test_a_follower_leaving_disturbs_nobody(cached_parkway, upstream) -> None:
    parkway = await cached_parkway()
    (leader, leaving, staying), send = await open_collapsed(parkway, upstream, 3)
    async with send:
        with watch_logs() as logs:
            await leaving.aclose()
            gone = await logs.wait_for(event="request", outcome="client_gone")
        for event in EVENTS[1:]:
            await send.send(event)
    assert gone["cache"] == "collapsed"
    replies = [await leader.finish(), await staying.finish()]
    assert all(r.complete and r.body == b"".join(EVENTS) for r in replies)
    hit = await call(parkway.port, "POST", url(parkway, upstream, pw_cache="60"), body=BODY)
    assert hit.headers["cache-status"].startswith("parkway; hit") and len(upstream.requests) == 1


async def test_the_leader_leaving_does_not_stop_its_followers(cached_parkway, upstream) -> None:
    """The upstream call belongs to the flight, not to the client whose request started it: when
    that client hangs up, the call goes on for the followers, and the answer is stored."""
    parkway = await cached_parkway()
    (leader, *followers), send = await open_collapsed(parkway, upstream, 3)
    async with send:
        with watch_logs() as logs:
            await leader.aclose()
            gone = await logs.wait_for(event="request", outcome="client_gone")
        assert gone["cache"] == "miss"
        for event in EVENTS[1:]:
            await send.send(event)
    replies = [await each.finish() for each in followers]
    assert all(r.complete and r.body == b"".join(EVENTS) for r in replies)
    hit = await call(parkway.port, "POST", url(parkway, upstream, pw_cache="60"), body=BODY)
    assert hit.headers["cache-status"].startswith("parkway; hit") and hit.body == b"".join(EVENTS)
    assert len(upstream.requests) == 1


async def test_when_every_client_leaves_the_upstream_call_stops(cached_parkway, upstream) -> None:
    parkway = await cached_parkway()
    calls, send = await open_collapsed(parkway, upstream, 2)
    async with send:
        for each in calls:
            await each.aclose()
        with trio.fail_after(5):
            await upstream.disconnected.wait()  # the proxy hung up on the upstream
    assert len(upstream.requests) == 1


BIG_CHUNK = b"x" * 65536
BIG_CHUNKS = 192  # 12 MiB: more than loopback socket buffers take from a client that reads nothing


class BigAnswer:
    """12 MiB as fast as the proxy takes it, once the test says go (after the first chunk)."""

    def __init__(self) -> None:
        self.go = trio.Event()

    async def __call__(self, ex: Any) -> None:
        await ex.send_head(200, [("content-type", "application/octet-stream")])
        await ex.send_data(BIG_CHUNK)
        await self.go.wait()
        for _ in range(BIG_CHUNKS - 1):
            await ex.send_data(BIG_CHUNK)
        await ex.send_end()


async def test_a_stalled_leader_client_delays_no_follower(cached_parkway, upstream) -> None:
    """The attack of issue 19: the client that starts a collapsed request stops reading. Followers
    get the whole answer at their own pace; the stalled client is cut alone."""
    upstream.behaviour = big = BigAnswer()
    parkway = await cached_parkway(max_entry_bytes=16 << 20)
    target = url(parkway, upstream, pw_cache="60")
    stalled = await trio.open_tcp_stream("127.0.0.1", parkway.port)
    await stalled.send_all(request_bytes("POST", target, BODY, headers=[("connection", "close")]))
    await upstream.wait_for_requests(1)
    try:
        with watch_logs() as logs, trio.fail_after(HANG_LIMIT):
            followers = [await Call.open(parkway.port, "POST", target, body=BODY) for _ in range(3)]
            for each in followers:
                await each.head()  # every follower is in before the rest of the answer comes
            big.go.set()
            start = trio.current_time()
            replies = [await each.finish() for each in followers]
            elapsed = trio.current_time() - start
            cut = await logs.wait_for(event="request", cache="miss")  # the stalled one, cut by its write timeout
    finally:
        await stalled.aclose()
    assert all(r.complete and len(r.body) == BIG_CHUNKS * len(BIG_CHUNK) for r in replies)
    assert all(r.headers["cache-status"] == "parkway; fwd=uri-miss; collapsed" for r in replies)
    assert elapsed < 2.0  # under client_write_timeout: nobody waited for the stalled client
    assert cut["outcome"] in ("client_gone", "upstream_error") and "did not read" in cut["error"]
    assert len(upstream.requests) == 1


async def test_an_interrupted_stream_is_not_stored_and_fails_its_followers(cached_parkway, upstream) -> None:
    upstream.behaviour = sse_then(EVENTS[:3], "close")
    parkway = await cached_parkway()
    target = url(parkway, upstream, pw_cache="60")
    leader = await Call.open(parkway.port, "POST", target, body=BODY)
    await leader.read_until(EVENTS[0])
    follower = await Call.open(parkway.port, "POST", target, body=BODY)
    first, second = await leader.finish(), await follower.finish()
    assert not first.complete and not second.complete  # cut, never passed off as complete
    upstream.behaviour = stream_events(upstream)
    again = await call(parkway.port, "POST", target, body=BODY)
    assert again.headers["cache-status"] == "parkway; fwd=uri-miss; stored"
    assert again.body == b"".join(EVENTS)


@pytest.mark.parametrize("status", [400, 404, 429, 500])
async def test_errors_are_not_stored(cached_parkway, upstream, status: int) -> None:
    upstream.behaviour = respond_with(status, b'{"error":"x"}', [("content-type", "application/json")])
    parkway = await cached_parkway()
    target = url(parkway, upstream, pw_cache="60")
    replies = [await call(parkway.port, "POST", target, body=BODY) for _ in range(2)]
    assert [r.status for r in replies] == [status, status] and len(upstream.requests) == 2
    assert replies[0].headers["cache-status"] == f'parkway; fwd=uri-miss; detail="status {status}"'


@pytest.mark.parametrize("directive", ["no-store", "private"])
async def test_upstream_no_store_and_private_are_honoured(cached_parkway, upstream, directive: str) -> None:
    upstream.behaviour = respond_with(200, b"{}", [("cache-control", directive)])
    parkway = await cached_parkway()
    target = url(parkway, upstream, pw_cache="60")
    for _ in range(2):
        await call(parkway.port, "POST", target, body=BODY)
    assert len(upstream.requests) == 2


async def test_the_browser_can_only_narrow(cached_parkway, upstream) -> None:
    answers = iter([b'{"n":1}', b'{"n":2}', b'{"n":3}'])

    async def numbered(ex: Any) -> None:
        await ex.respond(200, [("content-type", "application/json")], next(answers))

    upstream.behaviour = numbered
    parkway = await cached_parkway()
    target = url(parkway, upstream, pw_cache="60")
    only_cached = [("cache-control", "only-if-cached")]

    miss = await call(parkway.port, "POST", target, body=BODY, headers=only_cached)
    assert (miss.status, miss.code) == (504, "cache_miss") and upstream.requests == []
    no_store = await call(parkway.port, "POST", target, body=BODY, headers=[("cache-control", "no-store")])
    assert (no_store.body, no_store.headers["cache-status"]) == (b'{"n":1}', "parkway; fwd=bypass")
    assert (await call(parkway.port, "POST", target, body=BODY, headers=only_cached)).status == 504
    stored = await call(parkway.port, "POST", target, body=BODY)
    assert stored.body == b'{"n":2}'
    hit = await call(parkway.port, "POST", target, body=BODY, headers=only_cached)
    assert (hit.status, hit.body) == (200, b'{"n":2}')
    refreshed = await call(parkway.port, "POST", target, body=BODY, headers=[("cache-control", "no-cache")])
    assert (refreshed.body, refreshed.headers["cache-status"]) == (b'{"n":3}', "parkway; fwd=request; stored")
    assert (await call(parkway.port, "POST", target, body=BODY)).body == b'{"n":3}'
    assert len(upstream.requests) == 3

    # The browser cannot make a URL cacheable: an added pw_cache breaks the signature.
    unsigned = url(parkway, upstream, "/v1/other") + "&pw_cache=60"
    forged = await call(parkway.port, "POST", unsigned, body=BODY)
    assert forged.status == 403 and len(upstream.requests) == 3


async def test_the_key_separates_bodies_credentials_and_keys(cached_parkway, upstream) -> None:
    other = Credential("other", (SECRET,), (("Authorization", "Bearer sk-other"),))
    shared = CacheRules(namespace="team")
    parkway = await cached_parkway(
        credentials=(
            TEST_CREDENTIAL,
            other,
            replace(TEST_CREDENTIAL, id="team-a", cache=shared),
            replace(TEST_CREDENTIAL, id="team-b", cache=shared),
        )
    )

    async def ask(id: str, body: bytes = BODY) -> Reply:
        target = signed(parkway.base, upstream.base + "/v1/x", method="POST", id=id, params={"pw_cache": "60"})
        return await call(parkway.port, "POST", target, body=body)

    await ask("app")
    assert (await ask("app")).headers["cache-status"].startswith("parkway; hit")
    assert "hit" not in (await ask("app", BODY + b" ")).headers["cache-status"]  # one byte more
    assert "hit" not in (await ask("other")).headers["cache-status"]  # another credential
    assert "hit" not in (await ask("team-a")).headers["cache-status"]
    assert (await ask("team-b")).headers["cache-status"].startswith("parkway; hit")  # a shared namespace
    assert len(upstream.requests) == 4


async def test_credential_default_and_pw_cache_zero(cached_parkway, upstream) -> None:
    parkway = await cached_parkway(credentials=(replace(TEST_CREDENTIAL, cache=CacheRules(ttl=60, replay="paced")),))
    default = signed(parkway.base, upstream.base + "/v1/x", method="POST")
    off = signed(parkway.base, upstream.base + "/v1/x", method="POST", params={"pw_cache": "0"})
    for target in (default, default, off, off):
        await call(parkway.port, "POST", target, body=BODY)
    assert len(upstream.requests) == 3  # the default cached; pw_cache=0 turned it off for one URL
    parkway_without = await cached_parkway()
    none = signed(parkway_without.base, upstream.base + "/v1/y", method="POST")
    plain = await call(parkway_without.port, "POST", none, body=BODY)
    assert "cache-status" not in plain.headers  # neither pw_cache nor a default: never cached


async def test_a_hit_counts_against_rate_limits_but_holds_no_slot(cached_parkway, upstream) -> None:
    send, receive = trio.open_memory_channel[bytes](0)
    limited = replace(TEST_CREDENTIAL, limits=LimitSpec(max_concurrent=1, rate=1 / 60, burst=3))
    parkway = await cached_parkway(credentials=(limited,))
    target = url(parkway, upstream, "/v1/cached", pw_cache="60")
    await call(parkway.port, "POST", target, body=BODY)  # token 1: stored
    upstream.behaviour = sse_from(receive)
    held = await Call.open(parkway.port, "POST", url(parkway, upstream, "/v1/held"), body=BODY)  # token 2
    assert await held.head() == 200
    hit = await call(parkway.port, "POST", target, body=BODY)  # token 3; the only slot is taken: no matter
    assert hit.status == 200 and hit.headers["cache-status"].startswith("parkway; hit")
    refused = await call(parkway.port, "POST", target, body=BODY)  # no token left
    assert (refused.status, refused.code) == (429, "credential_rate_limit")
    await send.aclose()
    await held.finish()
    assert [r.path for r in upstream.requests] == ["/v1/cached", "/v1/held"]


async def test_the_address_guard_applies_to_hits(cached_parkway, upstream) -> None:
    """An entry fetched while loopback upstreams were allowed is not served once they are not."""
    parkway = await cached_parkway()
    target = url(parkway, upstream, pw_cache="60")
    assert (await call(parkway.port, "POST", target, body=BODY)).status == 200
    config = parkway.parkway.gateway.config
    parkway.parkway.gateway.apply(replace(config, server=replace(config.server, allow_private_upstreams=False)))
    refused = await call(parkway.port, "POST", target, body=BODY)
    assert (refused.status, refused.code) == (403, "upstream_address_refused")
    assert len(upstream.requests) == 1


async def test_the_body_rules_apply_to_hits(cached_parkway, upstream) -> None:
    """An answer stored while a model was allowed is not served once the credential's policy says no."""
    allowed = replace(TEST_CREDENTIAL, allowed_models=("gpt-4o-mini",))
    parkway = await cached_parkway(credentials=(allowed,))
    target = url(parkway, upstream, pw_cache="60")
    assert (await call(parkway.port, "POST", target, body=BODY)).status == 200
    config = parkway.parkway.gateway.config
    narrowed = replace(TEST_CREDENTIAL, allowed_models=("gpt-4o",))
    parkway.parkway.gateway.apply(replace(config, credentials=(narrowed,)))
    refused = await call(parkway.port, "POST", target, body=BODY)
    assert (refused.status, refused.code) == (403, "model_not_allowed")
    assert len(upstream.requests) == 1


async def test_single_use_applies_to_hits(cached_parkway, upstream) -> None:
    parkway = await cached_parkway()
    target = url(parkway, upstream, pw_cache="60")
    await call(parkway.port, "POST", target, body=BODY)
    once = url(parkway, upstream, pw_cache="60", pw_single_use="1")
    # The same upstream call (the key ignores Parkway's own parameters): a hit, once.
    assert (await call(parkway.port, "POST", once, body=BODY)).headers["cache-status"].startswith("parkway; hit")
    replayed = await call(parkway.port, "POST", once, body=BODY)
    assert (replayed.status, replayed.code) == (403, "already_used")
    assert len(upstream.requests) == 1


# --- two `parkway serve` processes sharing one Redis ---------------------------------------------------


async def start_redis_processes(processes: ProcessGroup, redis: RedisServer, tmp_path: Path) -> list[ParkwayProcess]:
    started = []
    for i in range(2):
        port, admin_port = free_port(), free_port()
        path = tmp_path / f"parkway-{i}.toml"
        toml = redis_parkway_toml(
            port=port, admin_port=admin_port, redis_url=redis.url, failure_policy="open",
            credentials=[{"id": "app", "secret": SECRET}],
        )  # fmt: skip
        path.write_text(toml + '\n[cache]\nbackend = "redis"\ntimeout = 0.5\nretry_interval = 0.2\n')
        started.append(await processes.spawn(path, port, admin_port=admin_port))
    for process in started:
        await process.logs.wait_for(event="startup", timeout=10)
    return started


async def ask(process: ParkwayProcess, upstream: Upstream, path: str = "/v1/chat/completions") -> Reply:
    target = signed(process.base, upstream.base + path, method="POST", params={"pw_cache": "600"})
    reply = await call(process.port, "POST", target, body=BODY)
    await process.logs.wait_for(event="request", request_id=reply.headers["x-request-id"])
    return reply


async def test_two_processes_share_entries_and_survive_a_redis_outage(processes, redis, upstream, tmp_path) -> None:
    upstream.behaviour = stream_events(upstream)
    one, two = await start_redis_processes(processes, redis, tmp_path)

    stored = await ask(one, upstream)
    hit = await ask(two, upstream)
    assert stored.headers["cache-status"] == "parkway; fwd=uri-miss; stored"
    assert hit.headers["cache-status"].startswith("parkway; hit") and hit.body == stored.body == b"".join(EVENTS)
    assert len(upstream.requests) == 1

    # Redis dies: served from the upstream, never an error; logged once per outage.
    await redis.kill()
    for _ in range(2):
        bypassed = await ask(two, upstream)
        assert (bypassed.status, bypassed.body) == (200, b"".join(EVENTS))
        assert bypassed.headers["cache-status"] == 'parkway; fwd=bypass; detail="cache store unavailable"'
    (down,) = await two.logs.wait_for(event="cache_unavailable")
    assert down["redis"] == redis.url
    lines = [line for line in two.logs.find(event="request") if line.get("cache") == "unavailable"]
    assert len(lines) == 2 and len(two.logs.find(event="cache_unavailable")) == 1
    assert len(upstream.requests) == 3

    # Redis returns, empty: the next request stores anew, and the other process hits it.
    await redis.start()

    async def stored_again() -> Reply | None:
        reply = await ask(two, upstream)
        return reply if reply.headers["cache-status"].endswith("stored") else None

    await poll(stored_again, timeout=5)
    await two.logs.wait_for(event="cache_recovered")

    async def hit_on_one() -> Reply | None:
        reply = await ask(one, upstream)
        return reply if reply.headers["cache-status"].startswith("parkway; hit") else None

    again = await poll(hit_on_one, timeout=5)
    assert again.body == b"".join(EVENTS)


async def test_a_websocket_session_is_never_cached(start_parkway, nursery: trio.Nursery) -> None:
    """A WebSocket handshake is a GET, but a session is not an answer: it is never looked up,
    stored or collapsed, even for a credential whose default ttl caches everything else."""
    realtime = await nursery.start(RealtimeUpstream().serve)
    parkway = await start_parkway(credentials=(replace(TEST_CREDENTIAL, cache=CacheRules(ttl=600)),))
    target = urlsplit(sign(parkway.base, realtime.url, signer="proxy.signing", params={"pw_cache": "600"}))
    with watch_logs() as logs:
        for _ in range(2):
            with trio.fail_after(5):
                async with ws_client(parkway.port, f"{target.path}?{target.query}") as ws:
                    assert json.loads(await ws.get_message())["type"] == "session.created"
        await logs.wait_for(event="request", status=101)
    assert len(realtime.sessions) == 2
    assert all("cache" not in line for line in logs.find(event="request"))


async def test_a_background_request_bypasses_the_cache(nursery: trio.Nursery, upstream, tmp_path: Path) -> None:
    """An answer stored for direct calls is not what a job gets: a job makes its own upstream call."""
    jobs = JobsConfig(enabled=True, path=str(tmp_path / "jobs.sqlite3"), poll_interval=0.05)
    parkways = Parkways(nursery)
    parkway = await parkways.start(with_jobs(make_config(), jobs))
    try:
        target = url(parkway, upstream, pw_cache="600", pw_async="1")
        assert (await call(parkway.port, "POST", target, body=BODY)).headers["cache-status"].endswith("stored")
        assert (await call(parkway.port, "POST", target, body=BODY)).headers["cache-status"].startswith("parkway; hit")
        queued = await call(parkway.port, "POST", target, body=BODY, headers=[("prefer", "respond-async")])
        assert queued.status == 202 and "cache-status" not in queued.headers
        with trio.fail_after(5):
            await upstream.wait_for_requests(2)  # the job's own call
    finally:
        await parkways.drain()


# --- issue 19: what the key does not cover, the upstream does not see; per_user; hostile numbers ----


def echo_org(upstream: Upstream) -> Callable[[Any], Awaitable[None]]:
    """An upstream that answers with what it saw of the headers an attacker might play with."""

    async def behaviour(ex: Any) -> None:
        seen = {n: ex.request.headers.get(n) for n in ("openai-organization", "x-evil", "cache-control", "user-agent")}
        await ex.respond(200, [("content-type", "application/json")], json.dumps(seen).encode())

    return behaviour


async def test_connection_cannot_poison_the_cache(cached_parkway, upstream) -> None:
    """The attack of issue 19, finding 1: an organisation header named in Connection is stripped
    before the upstream, so its answer must not be stored under that organisation's key, and a
    Cache-Control: no-cache must not overwrite the good entry with it."""
    upstream.behaviour = echo_org(upstream)
    parkway = await cached_parkway()
    target = url(parkway, upstream, pw_cache="600")
    victim = [("openai-organization", "org-victim")]
    first = await call(parkway.port, "POST", target, body=BODY, headers=victim)
    assert first.json()["openai-organization"] == "org-victim"

    attack = [*victim, ("connection", "OpenAI-Organization"), ("x-evil", "1"), ("cache-control", "no-cache"),
              ("user-agent", "attacker")]  # fmt: skip
    poisoned = await call(parkway.port, "POST", target, body=BODY, headers=attack)
    # The upstream saw none of what the key does not cover: no organisation, no other header.
    assert poisoned.json() == {"openai-organization": None, "x-evil": None, "cache-control": None, "user-agent": None}
    assert poisoned.headers["cache-status"] == "parkway; fwd=request; stored"  # stored under the no-org key

    again = await call(parkway.port, "POST", target, body=BODY, headers=victim)
    assert again.headers["cache-status"].startswith("parkway; hit")
    assert again.json()["openai-organization"] == "org-victim"  # the victim's entry is intact
    none = await call(parkway.port, "POST", target, body=BODY)
    assert none.headers["cache-status"].startswith("parkway; hit") and none.json()["openai-organization"] is None
    assert len(upstream.requests) == 2
    assert "x-evil" not in upstream.requests[1].headers and "user-agent" not in upstream.requests[1].headers


async def test_an_uncacheable_request_still_forwards_every_header(cached_parkway, upstream) -> None:
    """The narrowing applies only where an answer may be stored or shared."""
    upstream.behaviour = echo_org(upstream)
    parkway = await cached_parkway()
    target = url(parkway, upstream)  # no pw_cache
    seen = await call(parkway.port, "POST", target, body=BODY, headers=[("x-evil", "1"), ("user-agent", "ua")])
    assert seen.json()["x-evil"] == "1" and seen.json()["user-agent"] == "ua"


async def test_per_user_without_a_signed_user_is_refused(cached_parkway, upstream) -> None:
    per_user = replace(TEST_CREDENTIAL, cache=CacheRules(per_user=True))
    parkway = await cached_parkway(credentials=(per_user,))
    for _ in range(2):
        refused = await call(parkway.port, "POST", url(parkway, upstream, pw_cache="60"), body=BODY)
        assert (refused.status, refused.code) == (400, "cache_user_required")
        assert "pw_user" in refused.message
    assert upstream.requests == []
    alice = await call(parkway.port, "POST", url(parkway, upstream, pw_cache="60", pw_user="alice"), body=BODY)
    bob = await call(parkway.port, "POST", url(parkway, upstream, pw_cache="60", pw_user="bob"), body=BODY)
    assert alice.status == bob.status == 200 and "hit" not in bob.headers["cache-status"]
    assert len(upstream.requests) == 2


async def test_a_hostile_age_never_makes_a_hit_fail(cached_parkway, upstream) -> None:
    upstream.behaviour = respond_with(200, b"{}", [("content-type", "application/json"), ("age", "9" * 5000)])
    parkway = await cached_parkway()
    target = url(parkway, upstream, pw_cache="60")
    stored = await call(parkway.port, "POST", target, body=BODY)
    assert stored.status == 200 and stored.headers["cache-status"].endswith("stored")
    for _ in range(2):
        hit = await call(parkway.port, "POST", target, body=BODY)
        assert (hit.status, hit.body) == (200, b"{}") and hit.headers["cache-status"].startswith("parkway; hit")
        assert hit.headers["age"] == str(2**31)
    assert len(upstream.requests) == 1


@pytest.fixture
async def scripted(nursery: trio.Nursery) -> ScriptedUpstream:
    return await nursery.start(ScriptedUpstream().serve)


async def test_a_close_delimited_answer_is_never_stored(cached_parkway, scripted) -> None:
    """Neither a length nor chunked: the body ends when the upstream closes, as a crash would end it."""
    answer = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{"n":1}'
    scripted.answers = [answer_with(answer, close=True), answer_with(answer, close=True)]
    parkway = await cached_parkway()
    target = signed(parkway.base, scripted.base + "/v1/x", method="POST", params={"pw_cache": "60"})
    replies = [await call(parkway.port, "POST", target, body=BODY) for _ in range(2)]
    assert [r.body for r in replies] == [b'{"n":1}'] * 2
    assert replies[0].headers["cache-status"] == (
        'parkway; fwd=uri-miss; detail="answer ends at the connection\'s close (no length, not chunked)"'
    )
    assert len(scripted.requests) == 2
