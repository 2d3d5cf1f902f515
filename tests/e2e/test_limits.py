"""Limits, back pressure, single use, request policy and the SSRF guard, end to end.

Everything goes through real sockets: a client speaking HTTP/1.1 with its own ``h11``
(support.http.Call), Parkway, and the in-test loopback upstream that records what reached
it. Streams are held open by the upstream (support.upstream.HeldStreams) until the test releases
them, so "two streams in flight" is a state, not a race. Every refusal checks that the
upstream saw nothing: no request, and no connection when the refusal comes before forwarding.

The Redis tests run two real ``python -m proxy serve --config FILE`` processes sharing one
real redis-server (support.redis), which is killed and restarted mid-test.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import trio

from proxy.app import Parkway
from proxy.config import Credential, load_config
from proxy.limits import LimitSpec, parse_rate
from support.body_upstreams import BodySink
from support.http import Call, Reply, call
from support.logs import watch_logs
from support.parkway import TEST_CREDENTIAL, config_toml, redis_parkway_toml, run_parkway
from support.processes import ParkwayProcess, ProcessGroup, free_port, poll
from support.redis import RedisServer
from support.signing import SECRET, sign
from support.upstream import HeldStreams, Upstream, echo

pytestmark = pytest.mark.usefixtures("hang_guard")

HANG_LIMIT = 25.0  # the flood and the Redis tests take a few seconds each; nothing takes this long
# A refusal that is "immediate" answers within this: it never waits for a stream (held streams
# never end on their own, so waiting would hang), and it stays below the 5 s queue_timeout
# of the queue tests; the rest is margin for a loaded machine.
QUICK = 3.0


def credential(**policy) -> Credential:
    """The test credential ``app`` / SECRET with ``policy`` (limits, single_use, allowed_*, ...)."""
    return replace(TEST_CREDENTIAL, **policy)


def assert_refused(reply: Reply, status: int, code: str) -> None:
    """An OpenAI-shaped JSON refusal with the given status and code."""
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"] == "application/json"
    assert reply.code == code, reply.body
    assert reply.message
    assert reply.complete


def assert_nothing_reached(upstream: Upstream) -> None:
    """Not a request, not even a connection: the refusal came before anything was forwarded."""
    assert upstream.requests == []
    assert upstream.connections == 0


def held_url(parkway, upstream: Upstream, key: str) -> str:
    """A signed URL whose upstream answer is the held stream ``key``."""
    return sign(parkway.base, f"{upstream.base}/v1/chat/completions?hold={key}")


def numbered_url(parkway, upstream: Upstream, i: int) -> str:
    """A signed URL the upstream echoes, told apart by ``i``."""
    return sign(parkway.base, f"{upstream.base}/v1/models?i={i}")


async def open_stream(port: int, url: str, key: str) -> Call:
    """A held stream, once its first event has come through Parkway."""
    with trio.fail_after(5):
        stream = await Call.open(port, "GET", url)
        await stream.read_until(HeldStreams.first(key))
    assert stream.status == 200
    return stream


async def finish_stream(stream: Call, key: str, timeout: float = 5.0) -> Reply:
    """Read a released stream to its end; it must be byte for byte what the upstream sent."""
    with trio.fail_after(timeout):
        reply = await stream.finish()
    assert reply.complete, "the stream was cut"
    assert reply.body == HeldStreams.expected(key)
    return reply


# --- per-credential and per-user limits (memory state) --------------------------------------------


async def test_credential_concurrency_limit_refuses_the_third_stream(start_parkway, upstream):
    held = upstream.behaviour = HeldStreams()
    parkway = await start_parkway(credentials=(credential(limits=LimitSpec(max_concurrent=2)),))
    url = partial(held_url, parkway, upstream)

    with watch_logs() as logs:
        a = await open_stream(parkway.port, url("a"), "a")
        b = await open_stream(parkway.port, url("b"), "b")

        refused = await call(parkway.port, "GET", url("c"), timeout=QUICK)
        assert_refused(refused, 429, "credential_concurrency_limit")
        assert refused.headers["retry-after"] == "1"
        assert "2 at once" in refused.message
        assert [r.target.rpartition("=")[2] for r in upstream.requests] == ["a", "b"]
        assert upstream.connections == 2  # the refused one did not even open a connection

        held.release("a")
        done = await finish_stream(a, "a")
        with trio.fail_after(5):  # the log line comes after the slot is given back
            await logs.wait_for(event="request", request_id=done.headers["x-request-id"])
        d = await open_stream(parkway.port, url("d"), "d")
        held.release_all()
        await finish_stream(b, "b")
        await finish_stream(d, "d")
    assert len(upstream.requests) == 3


async def test_credential_rate_limit_refuses_at_once_with_retry_after(start_parkway, upstream):
    # 2 per minute, burst 2: the third request within the minute waits ~30 s for a token.
    rate = LimitSpec(rate=parse_rate("2/min"), burst=2)
    parkway = await start_parkway(credentials=(credential(limits=rate),))
    url = partial(numbered_url, parkway, upstream)

    first, second = [await call(parkway.port, "GET", url(i)) for i in (1, 2)]
    refused = await call(parkway.port, "GET", url(3), timeout=QUICK)

    assert (first.status, second.status) == (200, 200)
    assert_refused(refused, 429, "credential_rate_limit")
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    assert "'app'" in refused.message and "burst 2" in refused.message
    assert [r.target for r in upstream.requests] == ["/v1/models?i=1", "/v1/models?i=2"]


async def test_user_limits_follow_the_signed_user_and_log_it(start_parkway, upstream):
    # Each user 1 per minute; the credential as a whole 3 per minute.
    per_minute = parse_rate("1/min")
    parkway = await start_parkway(
        credentials=(
            credential(limits=LimitSpec(rate=per_minute, burst=3), user_limits=LimitSpec(rate=per_minute, burst=1)),
        )
    )

    def url(user: str | None, i: int) -> str:
        params = {"pw_user": user} if user else None
        return sign(parkway.base, f"{upstream.base}/v1/models?i={i}", signer="proxy.signing", params=params)

    with watch_logs() as logs:
        alice = await call(parkway.port, "GET", url("alice", 1))
        alice_again = await call(parkway.port, "GET", url("alice", 2), timeout=QUICK)
        bob = await call(parkway.port, "GET", url("bob", 3))
        anonymous = await call(parkway.port, "GET", url(None, 4))
        carol = await call(parkway.port, "GET", url("carol", 5), timeout=QUICK)

    assert (alice.status, bob.status, anonymous.status) == (200, 200, 200)
    assert_refused(alice_again, 429, "user_rate_limit")
    assert "alice" in alice_again.message and int(alice_again.headers["retry-after"]) >= 1
    # alice's refusal took no credential token: bob and the anonymous request had two left.
    assert_refused(carol, 429, "credential_rate_limit")
    assert [r.target for r in upstream.requests] == ["/v1/models?i=1", "/v1/models?i=3", "/v1/models?i=4"]
    lines = {line["request_id"]: line for line in logs.find(event="request")}
    by_reply = [lines[r.headers["x-request-id"]] for r in (alice, alice_again, bob, anonymous, carol)]
    assert [(line["user"], line["status"]) for line in by_reply] == [
        ("alice", 200),
        ("alice", 429),
        ("bob", 200),
        (None, 200),
        ("carol", 429),
    ]
    assert by_reply[1]["outcome"] == "refused:user_rate_limit"
    assert by_reply[4]["outcome"] == "refused:credential_rate_limit"


async def test_a_client_that_leaves_gives_its_slots_back(start_parkway, upstream):
    upstream.behaviour = HeldStreams()  # never released: the client leaves first
    parkway = await start_parkway(credentials=(credential(limits=LimitSpec(max_concurrent=1)),), max_in_flight=1)
    url = partial(held_url, parkway, upstream)

    with watch_logs() as logs:
        gone = await open_stream(parkway.port, url("gone"), "gone")
        await gone.aclose()
        with trio.fail_after(5):
            await logs.wait_for(event="request", outcome="client_gone")
            await upstream.disconnected.wait()  # and the upstream request was cancelled
        upstream.behaviour.release_all()
        after = await call(parkway.port, "GET", sign(parkway.base, f"{upstream.base}/v1/models"))
    assert after.status == 200


async def test_a_response_read_to_its_end_is_logged_ok_when_the_client_then_closes(start_parkway, upstream):
    """A client that closes its connection once it has the whole answer (Connection: close,
    as curl or an HTTP/1.0 client does) got everything: the log line and metrics must say
    ``ok``, not ``client_gone`` (and a non-streamed answer's token usage must not be lost)."""
    parkway = await start_parkway()
    with watch_logs() as logs:
        replies = [
            await call(parkway.port, "GET", sign(parkway.base, f"{upstream.base}/v1/models?i={i}")) for i in range(5)
        ]
        with trio.fail_after(5):
            lines = [await logs.wait_for(event="request", request_id=r.headers["x-request-id"]) for r in replies]
    assert all(r.status == 200 and r.complete for r in replies)
    assert [line["outcome"] for line in lines] == ["ok"] * 5, [line.get("error") for line in lines]


# --- global back pressure -------------------------------------------------------------------------


async def test_max_in_flight_refuses_the_excess_and_spares_the_streams(start_parkway, upstream):
    held = upstream.behaviour = HeldStreams()
    parkway = await start_parkway(max_in_flight=2)
    url = partial(held_url, parkway, upstream)
    a = await open_stream(parkway.port, url("a"), "a")
    b = await open_stream(parkway.port, url("b"), "b")

    refused = await call(parkway.port, "GET", url("c"), timeout=QUICK)

    assert_refused(refused, 503, "overloaded")
    assert refused.headers["retry-after"] == "1"
    assert "limit is 2" in refused.message
    assert len(upstream.requests) == 2 and upstream.connections == 2
    held.release_all()
    await finish_stream(a, "a")
    await finish_stream(b, "b")


async def test_a_queued_request_proceeds_when_a_slot_frees(start_parkway, upstream):
    held = upstream.behaviour = HeldStreams()
    parkway = await start_parkway(max_in_flight=2, max_queued=1, queue_timeout=5.0)
    url = partial(held_url, parkway, upstream)
    a = await open_stream(parkway.port, url("a"), "a")
    b = await open_stream(parkway.port, url("b"), "b")

    # Two more: one takes the only queue place, the other is refused at once (queue full).
    # Which is which is up to the scheduler; the refusal comes first either way.
    replies: dict[str, Reply] = {}
    first_answer = trio.Event()

    async def request(key: str) -> None:
        replies[key] = await call(parkway.port, "GET", url(key), timeout=10)
        first_answer.set()

    held.release("c")
    held.release("d")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "c")
        nursery.start_soon(request, "d")
        with trio.fail_after(QUICK):
            await first_answer.wait()
        ((refused_key, refused),) = replies.items()
        assert_refused(refused, 503, "overloaded")
        assert "waited" not in refused.message  # refused without waiting: the queue was full
        assert len(upstream.requests) == 2  # the queued one waits in Parkway, not upstream

        held.release("a")
        await finish_stream(a, "a")
    queued_key = "d" if refused_key == "c" else "c"
    queued = replies[queued_key]
    assert queued.status == 200 and queued.complete and queued.body == HeldStreams.expected(queued_key)
    assert [r.target.rpartition("=")[2] for r in upstream.requests] == ["a", "b", queued_key]
    held.release_all()
    await finish_stream(b, "b")


async def test_a_queued_request_gives_up_after_queue_timeout(start_parkway, upstream):
    held = upstream.behaviour = HeldStreams()
    parkway = await start_parkway(max_in_flight=1, max_queued=1, queue_timeout=0.3)
    a = await open_stream(parkway.port, sign(parkway.base, f"{upstream.base}/v1/chat?hold=a"), "a")

    started = trio.current_time()
    refused = await call(parkway.port, "GET", sign(parkway.base, f"{upstream.base}/v1/models"), timeout=3)
    waited = trio.current_time() - started

    assert_refused(refused, 503, "overloaded")
    assert "waited 0.3 s" in refused.message and refused.headers["retry-after"] == "1"
    assert 0.3 <= waited < 2.0
    assert len(upstream.requests) == 1
    held.release_all()
    await finish_stream(a, "a")


# Parkway forwards the abandoned request and then stops relaying between two chunks; httpx's
# nested body generators are then finalised by the GC (see test_proxy.py: a known httpx-under-Trio
# limitation, not what this test is about).
@pytest.mark.filterwarnings(r"ignore:Async generator 'http(x|core)2?\._:ResourceWarning")
async def test_a_client_that_leaves_the_queue_is_never_forwarded(start_parkway, upstream):
    """A browser that gave up while queued must not cost an upstream request (README: if the
    browser goes away, the upstream request is cancelled at once)."""
    held = upstream.behaviour = HeldStreams()
    parkway = await start_parkway(max_in_flight=1, max_queued=1, queue_timeout=5.0)
    a = await open_stream(parkway.port, sign(parkway.base, f"{upstream.base}/v1/chat?hold=a"), "a")

    with watch_logs() as logs:
        # Two more: one queued, one refused at once; the queued one's browser then leaves.
        calls = {}
        refused_first = trio.Event()

        async def request(path: str) -> None:
            calls[path] = await Call.open(parkway.port, "GET", sign(parkway.base, f"{upstream.base}{path}"))
            await calls[path].head()
            refused_first.set()

        async with trio.open_nursery() as nursery:
            for path in ("/v1/left-1", "/v1/left-2"):
                nursery.start_soon(request, path)
            with trio.fail_after(QUICK):
                await refused_first.wait()
            nursery.cancel_scope.cancel()  # the queued one will not get an answer before a is done
        answered = [path for path, c in calls.items() if c.status is not None]
        assert len(answered) == 1 and calls[answered[0]].status == 503
        queued_path = next(path for path in calls if path not in answered)
        for c in calls.values():
            await c.aclose()

        held.release("a")
        await finish_stream(a, "a")
        with trio.fail_after(5):  # what became of the abandoned request
            line = await logs.wait_for(event="request", upstream_path=queued_path)
    assert [r.path for r in upstream.requests] == ["/v1/chat"], (
        f"the request whose client left the queue was forwarded anyway (log: {line})"
    )


@pytest.mark.filterwarnings(r"ignore:Async generator 'http(x|core)2?\._:ResourceWarning")
async def test_a_client_that_leaves_before_the_first_byte_cancels_the_upstream(start_parkway, upstream):
    """README: if the browser goes away, the upstream request is cancelled at once (that stops
    token billing). LLM upstreams may think for a minute before their first byte."""
    answer = trio.Event()

    async def thinking(ex) -> None:
        await answer.wait()
        await echo(ex)

    upstream.behaviour = thinking
    parkway = await start_parkway()
    with watch_logs() as logs:
        with trio.fail_after(5):
            browser = await Call.open(parkway.port, "GET", sign(parkway.base, f"{upstream.base}/v1/think"))
            await upstream.wait_for_requests(1)
        await browser.aclose()
        with trio.move_on_after(5):  # at once when it works; the bound is for a loaded machine
            await upstream.disconnected.wait()
        cancelled = upstream.disconnected.is_set()
        answer.set()  # either way, let the request end before the test does
        with trio.fail_after(5):
            line = await logs.wait_for(event="request", upstream_path="/v1/think")
    assert cancelled, (
        "the browser left while Parkway waited for the upstream's first byte; the upstream request "
        f"was still open 5 s later and only ended once the upstream answered (log: {line})"
    )


# --- single use -----------------------------------------------------------------------------------


async def test_single_use_credential_refuses_the_second_use(start_parkway, upstream):
    parkway = await start_parkway(credentials=(credential(single_use=True),))
    url = sign(parkway.base, f"{upstream.base}/v1/models")

    first = await call(parkway.port, "GET", url)
    second = await call(parkway.port, "GET", url, timeout=QUICK)
    other = await call(parkway.port, "GET", sign(parkway.base, f"{upstream.base}/v1/models?other=1"))

    assert first.status == 200 and other.status == 200
    assert_refused(second, 403, "already_used")
    assert [r.target for r in upstream.requests] == ["/v1/models", "/v1/models?other=1"]


async def test_single_use_asked_per_url_with_a_signed_param(start_parkway, upstream):
    parkway = await start_parkway()  # the credential itself is not single-use
    once = sign(parkway.base, f"{upstream.base}/v1/models?once", signer="proxy.signing", params={"pw_single_use": "1"})
    reusable = sign(parkway.base, f"{upstream.base}/v1/models?reusable")

    replies = [await call(parkway.port, "GET", url) for url in (once, once, reusable, reusable)]

    assert [r.status for r in replies] == [200, 403, 200, 200]
    assert_refused(replies[1], 403, "already_used")
    assert [r.target for r in upstream.requests] == ["/v1/models?once", "/v1/models?reusable", "/v1/models?reusable"]


# --- request policy -------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"


def chat_body(**fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


# name: (credential policy, method, upstream path, body kwargs for Call.open, status, code)
POLICY_REFUSALS = {
    "method": (dict(allowed_methods=("POST",)), "GET", CHAT, {}, 403, "method_not_allowed"),
    "path": (dict(allowed_paths=(CHAT,)), "POST", "/v1/embeddings", dict(body=b"{}"), 403, "path_not_allowed"),
    "path lookalike": (
        dict(allowed_paths=("/v1/chat",)),
        "POST",
        "/v1/chatty",
        dict(body=b"{}"),
        403,
        "path_not_allowed",
    ),
    "declared body size": (dict(max_body_bytes=64), "POST", CHAT, dict(body=b"x" * 65), 413, "body_too_large"),
    "chunked body size": (dict(max_body_bytes=64), "POST", CHAT, dict(chunks=[b"x" * 65]), 413, "body_too_large"),
    "model": (
        dict(allowed_models=(MODEL,)),
        "POST",
        CHAT,
        dict(body=chat_body(model="gpt-4o")),
        403,
        "model_not_allowed",
    ),
    "model across chunks": (
        dict(allowed_models=(MODEL,)),
        "POST",
        CHAT,
        dict(chunks=[b'{"messages":[],', b'"model":"gpt', b'-4o"}']),
        403,
        "model_not_allowed",
    ),
    "model missing": (
        dict(allowed_models=(MODEL,)),
        "POST",
        CHAT,
        dict(body=b'{"messages":[]}'),
        403,
        "model_not_allowed",
    ),
    "model twice": (
        dict(allowed_models=(MODEL,)),
        "POST",
        CHAT,
        dict(body=b'{"model":"%s","model":"gpt-4o"}' % MODEL.encode()),
        403,
        "duplicate_field",
    ),
    "not JSON": (dict(allowed_models=(MODEL,)), "POST", CHAT, dict(body=b"model=gpt-4o"), 400, "invalid_json"),
    "max_tokens above the cap": (
        dict(max_tokens=100),
        "POST",
        CHAT,
        dict(body=chat_body(max_tokens=101)),
        403,
        "max_tokens_too_high",
    ),
    "max_completion_tokens above the cap": (
        dict(max_tokens=100),
        "POST",
        CHAT,
        dict(body=chat_body(max_completion_tokens=5000)),
        403,
        "max_tokens_too_high",
    ),
    "max_tokens required": (dict(max_tokens=100), "POST", CHAT, dict(body=chat_body()), 403, "max_tokens_required"),
    "n above the cap": (dict(max_n=1), "POST", CHAT, dict(chunks=[chat_body(n=2)]), 403, "n_too_high"),
}


@pytest.mark.parametrize("case", list(POLICY_REFUSALS))
async def test_request_policy_refuses_before_anything_is_forwarded(start_parkway, upstream, case):
    policy, method, path, request, status, code = POLICY_REFUSALS[case]
    parkway = await start_parkway(credentials=(credential(**policy),))
    url = sign(parkway.base, f"{upstream.base}{path}", method=method)

    refused = await call(parkway.port, method, url, timeout=QUICK, **request)

    assert_refused(refused, status, code)
    assert_nothing_reached(upstream)


async def test_streamed_body_over_the_size_cap_never_reaches_the_upstream_whole(start_parkway, nursery):
    # Size alone holds nothing back (policy.BodyInspector): chunks stream until the one that
    # would cross the cap, which is refused before it is sent. The upstream sees a body cut
    # short, never a complete request.
    sink = await nursery.start(BodySink().serve)
    parkway = await start_parkway(credentials=(credential(max_body_bytes=64),))
    url = sign(parkway.base, f"{sink.base}{CHAT}", method="POST")

    with trio.fail_after(5):
        ended = sink.ended
        refused = await call(parkway.port, "POST", url, chunks=[b"x" * 16] * 5)
        await ended.wait()

    assert_refused(refused, 413, "body_too_large")
    assert sink.complete == []
    assert sink.bodies == [b"x" * 64]  # four chunks went through; the fifth, over the cap, did not


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_request_within_every_rule_passes_byte_for_byte(start_parkway, upstream, framing):
    policy = dict(
        allowed_methods=("POST",),
        allowed_paths=(CHAT,),
        max_body_bytes=4096,
        allowed_models=(MODEL,),
        max_tokens=100,
        max_n=1,
    )
    parkway = await start_parkway(credentials=(credential(**policy),))
    body = chat_body(max_tokens=100, n=1, stream=True)
    request = dict(body=body) if framing == "content-length" else dict(chunks=[body[:7], body[7:40], body[40:]])

    reply = await call(parkway.port, "POST", sign(parkway.base, f"{upstream.base}{CHAT}", method="POST"), **request)

    assert reply.status == 200, reply.body
    (seen,) = upstream.requests
    assert (seen.method, seen.path, seen.body) == ("POST", CHAT, body)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_under_a_size_cap_alone_arrives_whole(start_parkway, nursery, framing):
    # max_body_bytes without any JSON rule: the body streams through, checked chunk by chunk.
    sink = await nursery.start(BodySink().serve)  # it also shows a body that arrives cut
    parkway = await start_parkway(credentials=(credential(max_body_bytes=4096),))
    body = chat_body(stream=True)
    request = dict(body=body) if framing == "content-length" else dict(chunks=[body[:7], body[7:40], body[40:]])

    with trio.fail_after(5):
        ended = sink.ended
        reply = await call(parkway.port, "POST", sign(parkway.base, f"{sink.base}{CHAT}", method="POST"), **request)
        await ended.wait()

    assert sink.bodies == [body], f"the upstream got {sink.bodies}; Parkway answered {reply.status} {reply.body!r}"
    assert sink.complete == [body]
    assert (reply.status, reply.body) == (200, b"ok")


# --- SSRF guard -----------------------------------------------------------------------------------


async def test_loopback_upstream_is_refused_without_allow_private(start_parkway, upstream):
    parkway = await start_parkway(allow_private_upstreams=False)

    refused = await call(parkway.port, "GET", sign(parkway.base, f"{upstream.base}/v1/models"), timeout=QUICK)

    assert_refused(refused, 403, "upstream_address_refused")
    assert "loopback" in refused.message
    assert_nothing_reached(upstream)


async def test_localhost_by_name_is_refused(start_parkway, upstream):
    parkway = await start_parkway(allow_private_upstreams=False)

    refused = await call(parkway.port, "GET", sign(parkway.base, f"http://localhost:{upstream.port}/v1/models"))

    assert_refused(refused, 403, "upstream_address_refused")
    assert "localhost resolves to a loopback address" in refused.message
    assert_nothing_reached(upstream)


@pytest.mark.parametrize("how", ["listed in allowed_upstreams", "credential allow_private_upstreams"])
async def test_loopback_upstream_allowed_explicitly(start_parkway, upstream, how):
    policy = (
        dict(allowed_upstreams=(f"http://127.0.0.1:{upstream.port}/",))
        if how.startswith("listed")
        else dict(allow_private_upstreams=True)
    )
    parkway = await start_parkway(credentials=(credential(**policy),), allow_private_upstreams=False)

    reply = await call(parkway.port, "GET", sign(parkway.base, f"{upstream.base}/v1/models"))

    assert reply.status == 200
    assert [r.target for r in upstream.requests] == ["/v1/models"]


async def test_cloud_metadata_is_refused_even_with_allow_private(start_parkway, upstream):
    # Safe to point at: an IP literal is checked (ssrf.GuardedBackend.connect_tcp) before any
    # connect attempt, so nothing is ever sent to 169.254.169.254.
    parkway = await start_parkway()  # TEST_SERVER: allow_private_upstreams = true
    url = sign(parkway.base, "http://169.254.169.254/latest/meta-data/iam/security-credentials/")

    refused = await call(parkway.port, "GET", url, timeout=QUICK)

    assert_refused(refused, 403, "upstream_address_refused")
    assert "cloud metadata" in refused.message


# --- flood ------------------------------------------------------------------------------------------

FLOOD = 300
FLOOD_CAP = 20
MEMORY_GROWTH_LIMIT = 1_500_000  # bytes over two rounds of 300: a leak of ~2.5 kB per request fails
# 300 connections opened at once take ~3 s a round on an idle 2-core machine and more than 10 s
# on a loaded one: the bounds only turn a hang into a failure, they time nothing.
FLOOD_ROUND_LIMIT = 40.0


async def flood_round(parkway, upstream: Upstream, logs, round_no: int) -> None:
    """FLOOD requests at once against max_in_flight=FLOOD_CAP, the admitted ones held open
    until every other one has been answered: exactly the excess gets 503, at once."""
    held = upstream.behaviour = HeldStreams()
    seen_before = len(upstream.requests)
    admitted: list[str] = []
    refused: list[Reply] = []
    finished: list[Reply] = []
    all_answered = trio.Event()

    def answered() -> None:
        if len(admitted) + len(refused) == FLOOD:
            all_answered.set()

    async def one(i: int) -> None:
        key = f"r{round_no}-{i}"
        opened = await Call.open(
            parkway.port, "GET", sign(parkway.base, f"{upstream.base}/v1/chat/completions?hold={key}")
        )
        if await opened.head() == 200:
            await opened.read_until(HeldStreams.first(key))
            admitted.append(key)
            answered()
            finished.append(await finish_stream(opened, key, timeout=FLOOD_ROUND_LIMIT))  # released last
        else:
            refused.append(await opened.finish())
            answered()

    with trio.fail_after(FLOOD_ROUND_LIMIT):
        async with trio.open_nursery() as nursery:
            for i in range(FLOOD):
                nursery.start_soon(one, i)
            await all_answered.wait()
            # Every refusal arrived while all admitted streams were still held: none waited.
            assert len(admitted) == FLOOD_CAP and len(refused) == FLOOD - FLOOD_CAP
            assert finished == []
            held.release_all()
        for reply in finished:  # each log line is written once its slot is back
            await logs.wait_for(event="request", request_id=reply.headers["x-request-id"])
    assert len(finished) == FLOOD_CAP  # byte for byte (finish_stream), none cut
    for reply in refused:
        assert_refused(reply, 503, "overloaded")
        assert reply.headers["retry-after"] == "1"
    assert len(upstream.requests) - seen_before == FLOOD_CAP
    assert parkway.parkway.gateway.gate.in_flight == 0
    assert parkway.parkway.gateway.gate.waiting == 0


# Three rounds, each bounded by FLOOD_ROUND_LIMIT, plus start-up: the round's own limit (which
# says which round) fires first; the hang guard only catches what lies outside the rounds.
@pytest.mark.hang_limit(3 * FLOOD_ROUND_LIMIT + 30)
async def test_flood_refuses_exactly_the_excess_and_memory_stays_flat(start_parkway, upstream):
    # The admitted streams are held silent for a whole round: Parkway's idle and request
    # timeouts must not cut them first.
    parkway = await start_parkway(
        max_in_flight=FLOOD_CAP, upstream_idle_timeout=FLOOD_ROUND_LIMIT, request_timeout=FLOOD_ROUND_LIMIT
    )

    def forget() -> None:  # what the test itself keeps must not count as Parkway's memory
        upstream.requests.clear()
        upstream.exchanges.clear()
        logs.entries.clear()
        gc.collect()

    with watch_logs() as logs:
        tracemalloc.start()
        try:
            await flood_round(parkway, upstream, logs, 0)  # warm-up: pools, caches, lazily built objects
            forget()
            before = tracemalloc.get_traced_memory()[0]
            for round_no in (1, 2):
                await flood_round(parkway, upstream, logs, round_no)
                forget()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    assert after - before < MEMORY_GROWTH_LIMIT, f"traced memory grew by {after - before} bytes over two floods"


# --- hot reload of the global cap -------------------------------------------------------------------


async def test_reload_applies_a_new_max_in_flight(nursery, upstream, tmp_path):
    """README: a reload applies new limits to new requests; only listen addresses and [state]
    need a restart (Parkway.reload warns about those, and about nothing else)."""
    held = upstream.behaviour = HeldStreams()
    path = tmp_path / "parkway.toml"
    path.write_text(config_toml(admin=None, secret=[SECRET], extra_server="max_in_flight = 1"))
    running = await run_parkway(nursery, Parkway(load_config(path), config_path=path))
    try:
        url = partial(held_url, running, upstream)
        a = await open_stream(running.port, url("a"), "a")
        assert (await call(running.port, "GET", url("b"), timeout=QUICK)).status == 503  # the cap is 1

        path.write_text(config_toml(admin=None, secret=[SECRET], extra_server="max_in_flight = 3"))
        with watch_logs() as logs:
            assert running.parkway.reload() == []
        assert not logs.find(event="config_reload_needs_restart")
        assert running.parkway.config.server.max_in_flight == 3

        second = await call(running.port, "GET", sign(running.base, f"{upstream.base}/v1/models"), timeout=QUICK)
        held.release_all()
        await finish_stream(a, "a")
        assert second.status == 200, (
            f"max_in_flight reloaded from 1 to 3, but a second request got {second.status} {second.body!r}"
        )
    finally:
        held.release_all()
        running.parkway.shutdown()
        with trio.fail_after(5):
            await running.stopped.wait()


# --- Redis: two Parkway processes, one limit ---------------------------------------------------------

REDIS_CREDENTIALS = [
    dict(id="limited", secret=SECRET, limits=dict(rate="1/min", burst=4)),
    dict(id="once", secret=SECRET, single_use=True),
    dict(id="solo", secret=SECRET, limits=dict(max_concurrent=1)),
]


async def start_processes(
    processes: ProcessGroup, redis: RedisServer, tmp_path: Path, *policies: str
) -> list[ParkwayProcess]:
    """One ``parkway serve --config`` process per failure policy, all on ``redis``; once each is up."""
    started = []
    for i, policy in enumerate(policies):
        port, admin_port = free_port(), free_port()
        path = tmp_path / f"parkway-{i}-{policy}.toml"
        path.write_text(
            redis_parkway_toml(
                port=port,
                admin_port=admin_port,
                redis_url=redis.url,
                failure_policy=policy,
                credentials=REDIS_CREDENTIALS,
            )
        )
        started.append(await processes.spawn(path, port, admin_port=admin_port))
    for process in started:
        await process.logs.wait_for(event="startup", timeout=10)
    return started


async def get(process: ParkwayProcess, upstream: Upstream, path: str, *, id: str, base: str | None = None) -> Reply:
    """A GET of ``upstream`` + ``path`` through ``process``, signed for ``base`` (default: its own)."""
    return await call(process.port, "GET", sign(base or process.base, f"{upstream.base}{path}", id=id))


async def readyz(process: ParkwayProcess) -> Reply:
    return await call(process.admin_port, "GET", f"http://127.0.0.1:{process.admin_port}/readyz")


async def logged(process: ParkwayProcess, reply: Reply) -> dict:
    """The request log line of ``reply`` (written after its slots were given back)."""
    (line,) = await process.logs.wait_for(event="request", request_id=reply.headers["x-request-id"])
    return line


async def test_two_processes_share_limits_and_survive_a_redis_outage(processes, redis, upstream, tmp_path):
    held = upstream.behaviour = HeldStreams()
    fail_open, fail_closed = both = await start_processes(processes, redis, tmp_path, "open", "closed")

    # One rate limit (burst 4) for both processes: alternating, exactly 4 pass in total.
    replies = [await get(both[i % 2], upstream, f"/v1/models?i={i}", id="limited") for i in range(8)]
    assert [r.status for r in replies] == [200] * 4 + [429] * 4
    for reply in replies[4:]:
        assert_refused(reply, 429, "credential_rate_limit")
        assert 1 <= int(reply.headers["retry-after"]) <= 60
    assert [r.target for r in upstream.requests] == [f"/v1/models?i={i}" for i in range(4)]

    # One single-use set: used on the first process, refused on the second (and the first).
    once = sign(fail_open.base, f"{upstream.base}/v1/models?once", id="once")
    used = await call(fail_open.port, "GET", once)
    replayed = [await call(p.port, "GET", once) for p in (fail_closed, fail_open)]
    assert used.status == 200
    for reply in replayed:
        assert_refused(reply, 403, "already_used")
    assert [r.target for r in upstream.requests].count("/v1/models?once") == 1

    # One concurrency limit: a stream held on one process fills the other's only slot too.
    stream = await open_stream(
        fail_open.port, sign(fail_open.base, f"{upstream.base}/v1/chat?hold=solo", id="solo"), "solo"
    )
    busy = await get(fail_closed, upstream, "/v1/models?solo=2", id="solo")
    assert_refused(busy, 429, "credential_concurrency_limit")
    held.release("solo")
    await logged(fail_open, await finish_stream(stream, "solo"))
    assert (await get(fail_closed, upstream, "/v1/models?solo=3", id="solo")).status == 200
    assert "/v1/models?solo=2" not in [r.target for r in upstream.requests]

    for process in both:
        ready = await readyz(process)
        assert (ready.status, ready.json()["checks"]["redis"]) == (200, True)

    # Redis dies. Open: served without limits (the bucket is empty, yet 200). Closed: 503.
    await redis.kill()
    seen = len(upstream.requests)
    served = await get(fail_open, upstream, "/v1/models?down=open", id="limited")
    refused = await get(fail_closed, upstream, "/v1/models?down=closed", id="limited")
    assert served.status == 200
    assert_refused(refused, 503, "state_unavailable")
    assert refused.headers["retry-after"] == "1"
    assert [r.target for r in upstream.requests[seen:]] == ["/v1/models?down=open"]
    for process, policy in ((fail_open, "open"), (fail_closed, "closed")):
        (down,) = await process.logs.wait_for(event="state_unavailable")
        assert (down["failure_policy"], down["redis"]) == (policy, redis.url)
        ready = await readyz(process)
        assert ready.status == 503
        assert ready.json()["checks"] == {"accepting": True, "config_loaded": True, "redis": False}

    # Redis returns, empty (no persistence): a fresh bucket of 4 shared by both processes.
    await redis.start()
    spent_after_restart = 0

    async def closed_back() -> Reply | None:
        reply = await get(fail_closed, upstream, "/v1/models?back=closed", id="limited")
        if reply.status == 503:
            assert reply.code == "state_unavailable"  # not tried yet: retry_interval
            return None
        return reply

    back = await poll(closed_back, timeout=5)
    assert back.status == 200
    spent_after_restart += 1
    await fail_closed.logs.wait_for(event="state_recovered")

    async def open_back() -> Reply | None:
        reply = await get(fail_open, upstream, "/v1/models?back=open", id="limited")
        await logged(fail_open, reply)  # state_recovered, if logged, came before this line
        return reply if fail_open.logs.find(event="state_recovered") else None

    back = await poll(open_back, timeout=5)
    assert back.status == 200
    spent_after_restart += 1  # the request that found Redis back went through it

    statuses = [(await get(both[i % 2], upstream, f"/v1/models?again={i}", id="limited")).status for i in range(6)]
    passing = 4 - spent_after_restart
    assert statuses == [200] * passing + [429] * (6 - passing)
    for process in both:
        ready = await readyz(process)
        assert (ready.status, ready.json()["checks"]["redis"]) == (200, True)


async def test_readyz_notices_redis_down_without_traffic(processes, redis, upstream, tmp_path):
    """/readyz includes Redis: with Redis dead (failure_policy closed: every request 503),
    the process must stop saying it is ready even if no request happens to try Redis."""
    (process,) = await start_processes(processes, redis, tmp_path, "closed")
    assert (await get(process, upstream, "/v1/models", id="limited")).status == 200
    assert (await readyz(process)).status == 200

    await redis.kill()

    async def not_ready() -> bool:
        return (await readyz(process)).status == 503

    try:
        await poll(not_ready, timeout=3)
    except trio.TooSlowError:
        before = await readyz(process)
        request = await get(process, upstream, "/v1/models?probe", id="limited")
        after = await readyz(process)
        pytest.fail(
            f"Redis has been dead for 3 s (retry_interval 0.2 s) but /readyz still answers {before.status} "
            f"{before.json()}; only a request notices it: that request got {request.status} "
            f"{request.code}, after which /readyz is {after.status} {after.json()}",
            pytrace=False,
        )


async def test_readyz_recovers_without_traffic_once_redis_returns(processes, redis, upstream, tmp_path):
    """A process marked unready gets no traffic from its load balancer; if only a request can
    find Redis back, it would stay unready (and out of rotation) for ever."""
    (process,) = await start_processes(processes, redis, tmp_path, "closed")
    assert (await get(process, upstream, "/v1/models", id="limited")).status == 200
    await redis.kill()
    assert_refused(await get(process, upstream, "/v1/models?down", id="limited"), 503, "state_unavailable")
    assert (await readyz(process)).status == 503

    await redis.start()

    async def ready() -> bool:
        return (await readyz(process)).status == 200

    try:
        await poll(ready, timeout=3)
    except trio.TooSlowError:
        request = await get(process, upstream, "/v1/models?probe", id="limited")
        after = await readyz(process)
        pytest.fail(
            "Redis has been back for 3 s (retry_interval 0.2 s) but /readyz still answers 503; "
            f"only a request finds Redis again: that request got {request.status}, after which "
            f"/readyz is {after.status} and state_recovered was logged "
            f"{len(process.logs.find(event='state_recovered'))} time(s)",
            pytrace=False,
        )
