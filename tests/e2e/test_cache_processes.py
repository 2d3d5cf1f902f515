"""Collapsing across processes: two `parkway serve` processes on one real redis-server.

Identical requests spread over both processes make one upstream call; every client gets the
same bytes at its own pace; killing the leader's process is survived: followers that have sent
nothing yet take over, followers already streaming are cut cleanly (never a short answer passed
off as complete).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import trio

from support.http import Call, call, request_bytes
from support.parkway import redis_parkway_toml
from support.processes import ParkwayProcess, ProcessGroup, free_port
from support.redis import RedisServer
from support.signing import SECRET, sign
from support.upstream import SSE_HEADERS, Upstream

GUARD = 30.0
EVENTS = [b'data: {"choices":[{"delta":{"content":"tok%d"}}]}\n\n' % i for i in range(8)] + [
    b'data: {"usage":{"prompt_tokens":11,"completion_tokens":8}}\n\n',
    b"data: [DONE]\n\n",
]
BODY = json.dumps({"model": "gpt-4o-mini", "temperature": 0, "stream": True, "messages": []}).encode()


async def start_two(
    processes: ProcessGroup, redis: RedisServer, tmp_path: Path, cache: str = ""
) -> list[ParkwayProcess]:
    started = []
    for i in range(2):
        port, admin_port = free_port(), free_port()
        path = tmp_path / f"parkway-{i}.toml"
        toml = redis_parkway_toml(
            port=port, admin_port=admin_port, redis_url=redis.url, failure_policy="open",
            credentials=[{"id": "app", "secret": SECRET}],
        )  # fmt: skip
        # A stalled client is cut by its own client_write_timeout, far above what the tests allow
        # the others; lock_timeout at its default: a loaded machine must not look like a dead leader.
        toml = toml.replace("[server]\n", "[server]\nclient_write_timeout = 60\n", 1)
        path.write_text(toml + f'\n[cache]\nbackend = "redis"\ntimeout = 0.5\n{cache}\n')
        started.append(await processes.spawn(path, port, admin_port=admin_port))
    for process in started:
        await process.logs.wait_for(event="startup", timeout=10)
    return started


def target(process: ParkwayProcess, upstream: Upstream) -> str:
    return sign(process.base, upstream.base + "/v1/chat/completions", method="POST", signer="proxy.signing",
                params={"pw_cache": "600"})  # fmt: skip


class Paced:
    """An upstream whose every answer is paced by the test: one channel per request, in order."""

    def __init__(self) -> None:
        self.channels: list[trio.MemorySendChannel[bytes]] = []
        self._receivers: list[trio.MemoryReceiveChannel[bytes]] = []
        for _ in range(4):
            send, receive = trio.open_memory_channel[bytes](100)
            self.channels.append(send)
            self._receivers.append(receive)
        self.answered = 0

    async def __call__(self, ex: Any) -> None:
        receive = self._receivers[self.answered]
        self.answered += 1
        first = await receive.receive()  # the head waits for the test's first event
        await ex.send_head(200, SSE_HEADERS)
        await ex.send_data(first)
        async for event in receive:
            await ex.send_data(event)
        await ex.send_end()


async def test_fifty_streams_over_two_processes_make_one_upstream_call(processes, redis, upstream, tmp_path) -> None:
    paced = Paced()
    upstream.behaviour = paced
    one, two = await start_two(processes, redis, tmp_path)
    with trio.fail_after(GUARD):
        calls = [await Call.open(one.port, "POST", target(one, upstream), body=BODY)]
        await upstream.wait_for_requests(1)
        for i in range(49):
            process = (one, two)[i % 2]
            calls.append(await Call.open(process.port, "POST", target(process, upstream), body=BODY))
        await paced.channels[0].send(EVENTS[0])
        for each in calls:
            await each.read_until(EVENTS[0])  # live: everyone has the first event before the rest is sent
        for event in EVENTS[1:]:
            await paced.channels[0].send(event)
        await paced.channels[0].aclose()
        replies = [await each.finish() for each in calls]
    assert len(upstream.requests) == 1
    assert all(r.complete and r.body == b"".join(EVENTS) for r in replies)
    statuses = sorted(r.headers["cache-status"] for r in replies)
    assert statuses == ["parkway; fwd=uri-miss; collapsed"] * 49 + ["parkway; fwd=uri-miss; stored"]
    hit = await call(two.port, "POST", target(two, upstream), body=BODY)
    assert hit.headers["cache-status"].startswith("parkway; hit") and hit.body == b"".join(EVENTS)


BIG_CHUNK = b"x" * 65536
BIG_CHUNKS = 192  # 12 MiB: more than the socket buffers take from a client that reads nothing


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


async def test_a_stalled_client_delays_nobody_on_either_process(processes, redis, upstream, tmp_path) -> None:
    upstream.behaviour = big = BigAnswer()
    one, two = await start_two(processes, redis, tmp_path, cache="max_entry_bytes = 16777216")
    stalled = await trio.open_tcp_stream("127.0.0.1", one.port)
    try:
        await stalled.send_all(request_bytes("POST", target(one, upstream), BODY, headers=[("connection", "close")]))
        with trio.fail_after(GUARD):
            await upstream.wait_for_requests(1)
            followers = [await Call.open(p.port, "POST", target(p, upstream), body=BODY) for p in (one, two, two)]
            for each in followers:
                await each.head()  # every follower is in before the rest of the answer comes
            big.go.set()
            start = trio.current_time()
            replies = [await each.finish() for each in followers]
            elapsed = trio.current_time() - start
    finally:
        await stalled.aclose()
    assert all(r.complete and len(r.body) == BIG_CHUNKS * len(BIG_CHUNK) for r in replies)
    assert all(r.headers["cache-status"] == "parkway; fwd=uri-miss; collapsed" for r in replies)
    assert elapsed < 30  # far under the stalled client's client_write_timeout (60 s here)
    assert len(upstream.requests) == 1


async def test_the_leaders_process_killed_before_its_answer_is_replaced(processes, redis, upstream, tmp_path) -> None:
    """Followers that have sent nothing yet: one of them takes over and makes the call itself."""
    paced = Paced()
    upstream.behaviour = paced
    one, two = await start_two(processes, redis, tmp_path)
    with trio.fail_after(GUARD):
        leader = await Call.open(one.port, "POST", target(one, upstream), body=BODY)
        await upstream.wait_for_requests(1)
        followers = [await Call.open(two.port, "POST", target(two, upstream), body=BODY) for _ in range(3)]
        await trio.sleep(0.3)  # no signal to wait on: the followers are parked on the leader's stream
        one.signal(signal.SIGKILL)
        await upstream.wait_for_requests(2)  # within lock_timeout, process two calls itself
        for event in EVENTS:
            await paced.channels[1].send(event)
        await paced.channels[1].aclose()
        replies = [await each.finish() for each in followers]
        await leader.aclose()
    assert len(upstream.requests) == 2
    assert all(r.complete and r.body == b"".join(EVENTS) for r in replies)
    statuses = sorted(r.headers["cache-status"] for r in replies)
    assert statuses == ["parkway; fwd=uri-miss; collapsed"] * 2 + ["parkway; fwd=uri-miss; stored"]


async def test_the_leaders_process_killed_mid_answer_cuts_streaming_followers(
    processes, redis, upstream, tmp_path
) -> None:
    """Followers already streaming are cut cleanly; the next identical request starts afresh."""
    paced = Paced()
    upstream.behaviour = paced
    one, two = await start_two(processes, redis, tmp_path)
    with trio.fail_after(GUARD):
        leader = await Call.open(one.port, "POST", target(one, upstream), body=BODY)
        await upstream.wait_for_requests(1)
        followers = [await Call.open(two.port, "POST", target(two, upstream), body=BODY) for _ in range(3)]
        await paced.channels[0].send(EVENTS[0])
        for each in (leader, *followers):
            await each.read_until(EVENTS[0])
        one.signal(signal.SIGKILL)
        replies = [await each.finish() for each in followers]
        start_again = trio.current_time()
        for event in EVENTS:
            await paced.channels[1].send(event)
        await paced.channels[1].aclose()
        again = await call(two.port, "POST", target(two, upstream), body=BODY, timeout=GUARD)
        await leader.aclose()
    assert not any(r.complete for r in replies)  # cut: never passed off as complete
    assert all(r.body == EVENTS[0] for r in replies)
    assert again.status == 200 and again.body == b"".join(EVENTS) and again.headers["cache-status"].endswith("stored")
    assert trio.current_time() - start_again < GUARD
    assert len(upstream.requests) == 2


async def test_no_cache_refreshes_across_processes(processes, redis, upstream, tmp_path) -> None:
    """A client's no-cache is never answered from an entry another process stored."""
    answers = iter([b'{"n":1}', b'{"n":2}'])

    async def numbered(ex: Any) -> None:
        await ex.respond(200, [("content-type", "application/json")], next(answers))

    upstream.behaviour = numbered
    one, two = await start_two(processes, redis, tmp_path)
    with trio.fail_after(GUARD):
        first = await call(one.port, "POST", target(one, upstream), body=BODY)
        # Each answer's entry is written before its log line, which says so (cache="stored"). The
        # client may have its answer before that (the wait for the store is bounded), so the next
        # step waits for the line: a late write of {"n":1} must not land after {"n":2}'s.
        await one.logs.wait_for(
            event="request", request_id=first.headers["x-request-id"], cache="stored", timeout=GUARD
        )
        refreshed = await call(two.port, "POST", target(two, upstream), body=BODY,
                               headers=[("cache-control", "no-cache")])  # fmt: skip
        await two.logs.wait_for(
            event="request", request_id=refreshed.headers["x-request-id"], cache="stored", timeout=GUARD
        )
        hit = await call(one.port, "POST", target(one, upstream), body=BODY)
    assert first.body == b'{"n":1}' and first.headers["cache-status"] == "parkway; fwd=uri-miss; stored"
    assert refreshed.body == b'{"n":2}' and refreshed.headers["cache-status"] == "parkway; fwd=request; stored"
    assert hit.body == b'{"n":2}' and hit.headers["cache-status"].startswith("parkway; hit")
    assert len(upstream.requests) == 2
