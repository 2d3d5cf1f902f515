"""End to end: httpx (the browser) → Parkway on a real socket → an h11 upstream on another.

URLs are signed by the real ``signway-sdk``. The upstream (support.upstream) is written
with h11 and plain trio sockets, independent of Parkway's own server, and records what
reached it, so every refusal also proves that nothing was forwarded. Pacing between the
test and the upstream is done with channels and events, never with sleeps.
"""

from __future__ import annotations

import gc
import json
from contextlib import aclosing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from urllib.parse import quote_plus

import httpx
import pytest
import trio
import trio.testing

from proxy.app import Parkway
from proxy.config import CorsConfig, Credential
from support.http import read_response, read_until_eof, request_bytes, stream_chunks
from support.logs import watch_logs
from support.parkway import TEST_CREDENTIAL, TEST_SERVER, make_config
from support.processes import free_port
from support.signing import INJECTED, SECRET, UPSTREAM_KEY
from support.upstream import SSE_HEADERS, Exchange, Upstream, echo, hang, respond_with, sse_from, sse_then


@pytest.fixture(params=["h11", "httptools"])
async def parkway(start_parkway, request):
    """Every test here runs with both request-head parsers (proxy.http.parsers)."""
    return await start_parkway(http=request.param)


# Every case on both relay drivers (the epoll engine and the portable one).
pytestmark = pytest.mark.usefixtures("hang_guard", "relay_path")

ORIGIN = "https://app.example"
EVENT_1 = b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
EVENT_2 = b'event: message\r\nid: 2\r\ndata: {"choices":[{"delta":{"content":"lo"}}]}\r\n\r\ndata: [DONE]\n\n'
HOP_BY_HOP = ("connection", "keep-alive", "proxy-authorization", "te", "trailer", "upgrade", "x-hop")

# An idle timeout a test expects to fire in the middle of a stream, and the pace of an upstream
# that must not trip it: a gap is cut only when the machine stalls for IDLE - PACE (0.8 s), which
# a 2-core machine shared by several test runs does not do, while waiting for it costs 1 s.
IDLE = 1.0
PACE = 0.2


def now() -> datetime:
    return datetime.now(UTC)


def assert_refused(response: httpx.Response, status: int, code: str, upstream: Upstream | None = None) -> None:
    """An OpenAI-shaped JSON error with CORS headers; with ``upstream``, nothing reached it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"]
    assert sorted(body["error"]) == ["code", "message", "type"]
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert response.headers["access-control-allow-origin"] == "*"
    if upstream is not None:
        assert upstream.requests == []
        assert upstream.connections == 0


async def read_exactly(chunks, size: int) -> bytes:
    """Read at least ``size`` bytes from an async iterator of chunks."""
    got = b""
    while len(got) < size:
        got += await chunks.__anext__()
    return got


# --- forwarding -----------------------------------------------------------------------------------


async def test_get_is_forwarded_with_the_header_policy(parkway, upstream, client):
    url = parkway.sign(f"{upstream.base}/v1/models?limit=2&order=desc")
    response = await client.get(
        url,
        headers={
            "Authorization": "Bearer client-supplied",
            "Cookie": "session=app-session",
            "X-Sw-Extra": "1",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "named in Connection",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic eHl6",
            "TE": "trailers",
            "X-Forwarded-For": "6.6.6.6",
            "X-Client": "kept",
            "Origin": ORIGIN,
        },
    )

    assert response.status_code == 200
    (seen,) = upstream.requests
    assert seen.method == "GET"
    assert seen.target == "/v1/models?limit=2&order=desc"
    assert seen.headers["host"] == upstream.netloc
    assert [v for n, v in seen.header_list if n == "authorization"] == [f"Bearer {UPSTREAM_KEY}"]
    assert seen.headers["x-forwarded-for"] == "127.0.0.1"
    assert seen.headers["x-forwarded-proto"] == "http"
    assert seen.headers["x-client"] == "kept"
    assert seen.headers["origin"] == ORIGIN
    assert not [n for n in seen.headers if n.startswith("x-sw-")]
    assert "cookie" not in seen.headers
    assert not [n for n in HOP_BY_HOP if n in seen.headers], seen.headers
    assert seen.body == b""
    # The answer comes back as the upstream sent it.
    assert response.headers["x-upstream"] == "echo"
    assert response.headers["content-type"] == "application/json"
    assert response.content == bytes(upstream.exchanges[0].sent_body)
    assert response.headers["content-length"] == str(len(response.content))
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.headers["x-request-id"]


async def test_post_fixed_length_body_both_ways(parkway, upstream, client):
    body = bytes(range(256)) * 64  # binary, 16 KiB
    url = parkway.sign(f"{upstream.base}/v1/files", method="POST")

    response = await client.post(url, content=body, headers={"Content-Type": "application/octet-stream"})

    assert response.status_code == 200
    (seen,) = upstream.requests
    assert seen.method == "POST"
    assert seen.body == body
    assert seen.headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in seen.headers
    assert seen.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == str(len(response.content))
    assert response.content == bytes(upstream.exchanges[0].sent_body)


async def test_post_chunked_body_both_ways(parkway, upstream, client):
    chunks = [b"first chunk|", b"\x00\xff binary|", b"x" * 70000, b"|last"]
    sent_back = [b"answer part 1\n", b"answer \xe2\x9c\x93 part 2\n", b"y" * 50000]

    async def chunked_answer(ex: Exchange) -> None:
        await ex.send_head(201, [("content-type", "application/x-ndjson"), ("x-answer", "chunked")])
        for part in sent_back:
            await ex.send_data(part)
        await ex.send_end()

    upstream.behaviour = chunked_answer
    url = parkway.sign(f"{upstream.base}/v1/upload?kind=chunked", method="PUT")

    response = await client.put(url, content=stream_chunks(chunks))

    (seen,) = upstream.requests
    assert seen.method == "PUT"
    assert seen.target == "/v1/upload?kind=chunked"
    assert seen.body == b"".join(chunks)
    assert seen.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in seen.headers
    assert response.status_code == 201
    assert response.headers["x-answer"] == "chunked"
    assert response.headers["content-type"] == "application/x-ndjson"
    assert "content-length" not in response.headers
    assert response.content == b"".join(sent_back)


async def test_upstream_error_status_passes_through(parkway, upstream, client):
    payload = b'{"error":{"message":"model overloaded"}}'
    upstream.behaviour = respond_with(500, payload, [("content-type", "application/json"), ("x-upstream", "sad")])

    response = await client.post(parkway.sign(f"{upstream.base}/v1/chat/completions", method="POST"))

    assert response.status_code == 500
    assert response.content == payload
    assert response.headers["x-upstream"] == "sad"
    assert len(upstream.requests) == 1


# --- signatures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(json.dumps({"model": "gpt-4o-mini", "stream": False}), id="ascii"),
        # The Python SDK signs len(str) as Content-Length; httpx sends the byte length.
        pytest.param(json.dumps({"content": "héllo wörld ✓"}, ensure_ascii=False), id="non-ascii"),
    ],
)
async def test_signed_headers_and_body_pass(parkway, upstream, client, body):
    headers = {"Content-Type": "application/json", "X-Client-Version": "1.2"}
    url = parkway.sign(f"{upstream.base}/v1/chat/completions", method="POST", headers=headers, body=body)

    response = await client.post(url, content=body.encode(), headers=headers)

    assert response.status_code == 200, response.text
    (seen,) = upstream.requests
    assert seen.body == body.encode()
    assert seen.headers["content-length"] == str(len(body.encode()))
    assert seen.headers["x-client-version"] == "1.2"
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def _request(method: str, url: str, headers: dict | None = None, content: bytes | None = None) -> dict:
    return {"method": method, "url": url, "headers": {"Origin": ORIGIN, **(headers or {})}, "content": content}


# name: (status, code, build(parkway, upstream) -> request)
REFUSALS = {
    "expired": (
        403,
        "expired",
        lambda p, u: _request("GET", p.sign(f"{u.base}/v1/models", expiry=60, when=now() - timedelta(hours=2))),
    ),
    "date in the future": (
        403,
        "date_in_future",
        lambda p, u: _request("GET", p.sign(f"{u.base}/v1/models", when=now() + timedelta(hours=1))),
    ),
    "wrong secret": (
        403,
        "signature_mismatch",
        lambda p, u: _request("GET", p.sign(f"{u.base}/v1/models", secret="not-the-secret")),
    ),
    "unknown credential": (
        401,
        "unknown_credential",
        lambda p, u: _request("GET", p.sign(f"{u.base}/v1/models", id="ghost")),
    ),
    "signed header missing": (
        403,
        "signed_header_missing",
        lambda p, u: _request("GET", p.sign(f"{u.base}/v1/models", headers={"X-Client-Version": "1.2"})),
    ),
    "signed header differs": (
        403,
        "signature_mismatch",
        lambda p, u: _request(
            "GET",
            p.sign(f"{u.base}/v1/models", headers={"X-Client-Version": "1.2"}),
            headers={"X-Client-Version": "1.3"},
        ),
    ),
    "tampered body": (
        403,
        "signature_mismatch",
        lambda p, u: _request("POST", p.sign(f"{u.base}/v1/chat", method="POST", body='{"n":1}'), content=b'{"n":2}'),
    ),
    "tampered proxy url": (
        403,
        "signature_mismatch",
        lambda p, u: _request(
            "GET", p.sign(f"{u.base}/v1/models").replace(quote_plus("/v1/models"), quote_plus("/v1/admin"))
        ),
    ),
    "other method": (
        403,
        "signature_mismatch",
        lambda p, u: _request("DELETE", p.sign(f"{u.base}/v1/models", method="GET")),
    ),
    "no X-Sw parameters": (400, "missing_signature_params", lambda p, u: _request("GET", f"{p.base}/?model=gpt")),
    "X-Sw-Signature missing": (
        400,
        "malformed_signed_url",
        lambda p, u: _request("GET", p.sign(f"{u.base}/v1/models").rpartition("&X-Sw-Signature=")[0]),
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refusals_forward_nothing(parkway, upstream, client, case):
    status, code, build = REFUSALS[case]

    response = await client.request(**build(parkway, upstream))

    assert_refused(response, status, code, upstream)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_signed_body_over_the_limit_is_413(start_parkway, upstream, client, framing):
    parkway = await start_parkway(max_signed_body_bytes=16)
    body = "x" * 64
    url = parkway.sign(f"{upstream.base}/v1/chat", method="POST", body=body)
    content = body.encode() if framing == "content-length" else stream_chunks([b"x" * 8] * 8)

    response = await client.post(url, content=content)

    assert_refused(response, 413, "body_too_large", upstream)


async def test_upstream_outside_allowed_upstreams_is_403(start_parkway, upstream, client):
    credential = replace(TEST_CREDENTIAL, allowed_upstreams=(f"{upstream.base}/v1/",))
    parkway = await start_parkway(credentials=(credential,))

    refused = await client.get(parkway.sign(f"{upstream.base}/v2/secret"))
    assert_refused(refused, 403, "upstream_not_allowed", upstream)

    allowed = await client.get(parkway.sign(f"{upstream.base}/v1/models"))
    assert allowed.status_code == 200
    assert [r.path for r in upstream.requests] == ["/v1/models"]


async def test_key_rotation_accepts_old_and_new_secrets(start_parkway, upstream, client):
    parkway = await start_parkway(credentials=(Credential("app", ("old", "new"), INJECTED),))

    for secret in ("old", "new"):
        response = await client.get(parkway.sign(f"{upstream.base}/v1/models?with={secret}", secret=secret))
        assert response.status_code == 200, secret
    third = await client.get(parkway.sign(f"{upstream.base}/v1/models?with=third", secret="third"))

    assert_refused(third, 403, "signature_mismatch")
    assert [r.target for r in upstream.requests] == ["/v1/models?with=old", "/v1/models?with=new"]


# --- streaming ------------------------------------------------------------------------------------


async def test_sse_reaches_the_client_event_by_event(parkway, upstream, client):
    send, receive = trio.open_memory_channel[bytes](0)
    upstream.behaviour = sse_from(receive)
    url = parkway.sign(f"{upstream.base}/v1/chat/completions", method="POST")

    async with (
        send,
        client.stream("POST", url, json={"stream": True}) as response,
        aclosing(response.aiter_raw()) as chunks,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["x-accel-buffering"] == "no"
        await send.send(EVENT_1)
        with trio.fail_after(5):
            got = await read_exactly(chunks, len(EVENT_1))
        # Event 1 is through while the upstream is still waiting to send event 2.
        assert got == EVENT_1
        assert bytes(upstream.exchanges[0].sent_body) == EVENT_1
        await send.send(EVENT_2)
        await send.aclose()
        async for chunk in chunks:
            got += chunk

    assert got == EVENT_1 + EVENT_2 == bytes(upstream.exchanges[0].sent_body)


async def test_client_disconnect_cancels_the_upstream(parkway, upstream, client):
    send, receive = trio.open_memory_channel[bytes](0)
    upstream.behaviour = sse_from(receive)
    url = parkway.sign(f"{upstream.base}/v1/chat/completions", method="POST")

    with watch_logs() as logs:
        async with send:
            # A raw socket as the browser: httpx cannot drop a half-read stream under Trio
            # without leaving its async generators to the garbage collector (ResourceWarning).
            with trio.fail_after(5):
                async with await trio.open_tcp_stream("127.0.0.1", parkway.port) as stream:
                    await stream.send_all(request_bytes("POST", url, b'{"stream": true}'))
                    await send.send(EVENT_1)
                    received = b""
                    while EVENT_1 not in received:
                        received += await stream.receive_some(65536)
            assert received.startswith(b"HTTP/1.1 200 ")
            # The socket is closed: Parkway must notice and hang up on the upstream.
            with trio.fail_after(5):
                await upstream.disconnected.wait()
                entry = await logs.wait_for(event="request", outcome="client_gone")

    assert entry["status"] == 200
    assert entry["credential"] == "app"
    assert bytes(upstream.exchanges[0].sent_body) == EVENT_1


# --- upstream failures ----------------------------------------------------------------------------


async def test_upstream_connection_refused_is_502(parkway, client):
    response = await client.get(parkway.sign(f"http://127.0.0.1:{free_port()}/v1/models"))

    assert_refused(response, 502, "upstream_connect_failed")


async def test_upstream_that_never_answers_is_504(start_parkway, upstream, client):
    parkway = await start_parkway(upstream_first_byte_timeout=0.3)
    upstream.behaviour = hang

    with watch_logs() as logs:
        response = await client.get(parkway.sign(f"{upstream.base}/v1/models"))
        with trio.fail_after(5):
            entry = await logs.wait_for(event="request", outcome="upstream_error")

    assert_refused(response, 504, "upstream_timeout")
    assert len(upstream.requests) == 1
    assert entry["status"] == 504
    with trio.fail_after(5):  # Parkway hung up on the silent upstream
        await upstream.disconnected.wait()


@pytest.mark.parametrize(
    ("first_byte", "overall", "code", "error"),
    [
        (0.3, 30.0, "upstream_timeout", "sent no response within 0.3 s"),
        (30.0, 0.3, "request_timeout", "request exceeded the overall limit of 0.3 s"),
    ],
)
async def test_the_first_byte_and_the_overall_timeouts_each_fire_with_their_own_error(
    start_parkway, upstream, client, first_byte, overall, code, error
):
    # The first byte's deadline rides on the request's overall scope (proxy.upstream.client):
    # whichever fires, the client, the log and the code name that one.
    parkway = await start_parkway(upstream_first_byte_timeout=first_byte, request_timeout=overall)
    upstream.behaviour = hang

    with watch_logs() as logs:
        response = await client.get(parkway.sign(f"{upstream.base}/v1/models"))
        with trio.fail_after(5):
            entry = await logs.wait_for(event="request", outcome="upstream_error")

    assert_refused(response, 504, code)
    assert error in response.json()["error"]["message"]
    assert entry["status"] == 504
    assert error in entry["error"]
    with trio.fail_after(5):  # Parkway hung up on the silent upstream
        await upstream.disconnected.wait()


async def test_the_first_byte_deadline_waits_in_the_sweep_not_on_the_request_scope(
    start_parkway, upstream, client, nursery, relay_path
):
    # The request's own scope keeps its overall deadline while the first byte's is an entry in
    # the upstream client's sweep (no trio deadline lowered and restored per request); the
    # sweep still answers 504 with the first byte's own error, within its tick.
    first_byte, overall = 2.0, 30.0
    parkway = await start_parkway(upstream_first_byte_timeout=first_byte, request_timeout=overall)
    sweep = parkway.parkway.upstream.first_bytes
    upstream.behaviour = hang
    responses: list[httpx.Response] = []
    answered = trio.Event()

    async def call() -> None:
        responses.append(await client.get(parkway.sign(f"{upstream.base}/v1/models")))
        answered.set()

    with watch_logs() as logs:
        nursery.start_soon(call)
        with trio.fail_after(first_byte):  # entered before the request went out
            await upstream.wait_for_requests()
        assert sweep.running
        [(scope, deadline)] = sweep.deadlines.items()
        assert scope.deadline - deadline == pytest.approx(overall - first_byte, abs=0.5)
        with trio.fail_after(first_byte + 10):
            entry = await logs.wait_for(event="request", outcome="upstream_error")
            await answered.wait()
    assert not sweep.deadlines
    assert_refused(responses[0], 504, "upstream_timeout")
    assert entry["error"].endswith(f"sent no response within {first_byte:g} s")
    assert first_byte * 1000 <= entry["duration_ms"]


async def test_a_head_in_time_lifts_the_first_byte_deadline_for_the_body(start_parkway, upstream, client):
    # The first byte's deadline is the request scope's until the head; a body slower than it is not cut.
    first_byte = 0.3
    parkway = await start_parkway(upstream_first_byte_timeout=first_byte, request_timeout=30.0)

    async def slow_body(ex: Exchange) -> None:
        await ex.send_head(200, [("content-type", "text/plain"), ("content-length", "4")])
        await trio.sleep(first_byte * 3)  # the time itself is what is tested: well past the deadline
        await ex.send_data(b"late")
        await ex.send_end()

    upstream.behaviour = slow_body
    with watch_logs() as logs:
        response = await client.get(parkway.sign(f"{upstream.base}/v1/models"))
        with trio.fail_after(5):
            entry = await logs.wait_for(event="request")

    assert (response.status_code, response.content) == (200, b"late")
    assert (entry["status"], entry["outcome"]) == (200, "ok")
    assert entry["duration_ms"] >= first_byte * 3 * 1000


@pytest.mark.parametrize("then", ["hang", "close"])
async def test_upstream_failing_mid_stream_truncates_the_response(start_parkway, upstream, client, then):
    parkway = await start_parkway(upstream_idle_timeout=IDLE)
    upstream.behaviour = sse_then([EVENT_1], then)
    url = parkway.sign(f"{upstream.base}/v1/chat/completions", method="POST")

    got = b""
    with watch_logs() as logs:
        async with (
            client.stream("POST", url, json={"stream": True}) as response,
            aclosing(response.aiter_raw()) as chunks,
        ):
            assert response.status_code == 200
            # No chunked terminator: httpx sees an incomplete body, not a clean end.
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                async for chunk in chunks:
                    got += chunk
        with trio.fail_after(5):
            entry = await logs.wait_for(event="request", outcome="upstream_error")

    assert got == EVENT_1
    assert entry["status"] == 200
    if then == "hang":
        assert f"{IDLE:g} s" in entry["error"]
    # One failed upstream ends one response, not the server.
    upstream.behaviour = echo
    assert (await client.get(parkway.sign(f"{upstream.base}/v1/models"))).status_code == 200


async def test_steady_stream_outlasting_the_idle_timeout_is_relayed_and_a_later_gap_still_cut(
    start_parkway, upstream, client
):
    # One cancel scope limits every gap of a relay, its deadline moved forward as chunks come:
    # a stream lasting many idle timeouts is not cut, and a silence after it still is.
    parkway = await start_parkway(upstream_idle_timeout=IDLE)
    events = [b"data: %d\n\n" % i for i in range(10)]  # 10 x PACE: twice the idle timeout

    async def steady_then_silent(ex: Exchange) -> None:
        await ex.send_head(200, SSE_HEADERS)
        for event in events:
            await ex.send_data(event)
            await trio.sleep(PACE)  # the upstream's pace is what this test is about
        await trio.sleep_forever()

    upstream.behaviour = steady_then_silent
    url = parkway.sign(f"{upstream.base}/v1/chat/completions", method="POST")

    got = b""
    with watch_logs() as logs:
        async with (
            client.stream("POST", url, json={"stream": True}) as response,
            aclosing(response.aiter_raw()) as chunks,
        ):
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                async for chunk in chunks:
                    got += chunk
        with trio.fail_after(5):
            entry = await logs.wait_for(event="request", outcome="upstream_error")

    assert got == b"".join(events)
    assert f"{IDLE:g} s" in entry["error"]


async def test_small_answer_whose_upstream_dies_before_the_body_still_gets_its_head(start_parkway, upstream):
    # A small fixed-length answer's head is held for its body (one write); when the body never
    # comes, the client still sees the head and then a truncated body, as without holding.
    parkway = await start_parkway()

    async def head_then_close(ex: Exchange) -> None:
        await ex.send_head(200, [("content-type", "application/json"), ("content-length", "100")])
        await ex.close()

    upstream.behaviour = head_then_close
    url = parkway.sign(f"{upstream.base}/v1/models")

    with watch_logs() as logs:
        with trio.fail_after(5):
            async with await trio.open_tcp_stream("127.0.0.1", parkway.port) as stream:
                await stream.send_all(request_bytes("GET", url))
                raw = await read_until_eof(stream)
            entry = await logs.wait_for(event="request", outcome="upstream_error")

    assert raw.startswith(b"HTTP/1.1 200 ")
    assert raw.endswith(b"\r\n\r\n")  # the head, and none of the promised body
    assert entry["status"] == 200


# When Parkway stops relaying between two chunks, httpx's nested body generators are left
# suspended and Trio warns as it finalises them: an httpx-under-Trio limitation (closing
# ``aiter_raw`` does not close the generators inside it), not Parkway's. Parkway's own
# generators are still checked.
@pytest.mark.filterwarnings(r"ignore:Async generator 'http(x|core)2?\._:ResourceWarning")
async def test_client_that_stops_reading_is_cut_after_client_write_timeout(start_parkway, upstream, client):
    parkway = await start_parkway(client_write_timeout=0.3)

    async def flood(ex: Exchange) -> None:
        await ex.send_head(200, SSE_HEADERS)
        while True:  # until Parkway hangs up (send fails or the disconnect watcher cancels)
            await ex.send_data(b"data: " + b"x" * 65536 + b"\n\n")

    upstream.behaviour = flood
    url = parkway.sign(f"{upstream.base}/v1/chat/completions", method="POST")

    with watch_logs() as logs:
        with trio.fail_after(5):
            async with await trio.open_tcp_stream("127.0.0.1", parkway.port) as stream:
                await stream.send_all(request_bytes("POST", url, b"{}"))
                # Never read: Parkway's writes block until client_write_timeout.
                entry = await logs.wait_for(event="request", outcome="client_gone")
                await upstream.disconnected.wait()

    assert "0.3 s" in entry["error"]
    upstream.behaviour = echo
    assert (await client.get(parkway.sign(f"{upstream.base}/v1/models"))).status_code == 200


# --- CORS -----------------------------------------------------------------------------------------


async def test_preflight_is_answered_locally(parkway, upstream, client):
    url = parkway.sign(f"{upstream.base}/v1/chat/completions", method="POST")

    response = await client.options(
        url,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-client-version",
        },
    )

    assert response.status_code == 204
    assert response.content == b""
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.headers["access-control-allow-methods"] == "GET, POST, PUT, PATCH, DELETE, OPTIONS"
    assert response.headers["access-control-allow-headers"] == "content-type, x-client-version"
    assert response.headers["access-control-max-age"] == "600"
    assert upstream.requests == [] and upstream.connections == 0


async def test_configured_origins_are_echoed_and_others_get_no_cors(start_parkway, upstream, client):
    parkway = await start_parkway(cors=CorsConfig(allow_origins=(ORIGIN,)))
    evil = "https://evil.example"
    preflight = {"Access-Control-Request-Method": "POST"}

    allowed = await client.get(parkway.sign(f"{upstream.base}/v1/models"), headers={"Origin": ORIGIN})
    other = await client.get(parkway.sign(f"{upstream.base}/v1/models"), headers={"Origin": evil})
    allowed_preflight = await client.options(parkway.base + "/", headers={"Origin": ORIGIN, **preflight})
    other_preflight = await client.options(parkway.base + "/", headers={"Origin": evil, **preflight})

    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "Origin" in allowed.headers["vary"]
    assert other.status_code == 200  # forwarded; the browser is who withholds the answer
    assert "access-control-allow-origin" not in other.headers
    assert allowed_preflight.status_code == 204
    assert allowed_preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-methods" in allowed_preflight.headers
    assert other_preflight.status_code == 204
    assert "access-control-allow-origin" not in other_preflight.headers
    assert "access-control-allow-methods" not in other_preflight.headers
    assert len(upstream.requests) == 2


# --- malformed HTTP -------------------------------------------------------------------------------

BIG = b"X-Big: " + b"a" * 2000 + b"\r\n"
MALFORMED = {
    "garbage request line": (b"GARBAGE\r\n\r\n", 400, "malformed_http"),
    "header line without colon": (b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400, "malformed_http"),
    "head too large, still arriving": (b"GET / HTTP/1.1\r\nHost: x\r\n" + BIG, 431, "headers_too_large"),
    "head too large, complete": (b"GET / HTTP/1.1\r\nHost: x\r\n" + BIG + b"\r\n", 431, "headers_too_large"),
    "head not finished in time": (b"GET / HTTP/1.1\r\nHost: x\r\n", 408, "client_timeout"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_http_gets_a_json_error_and_a_close(start_parkway, upstream, client, case):
    data, status, code = MALFORMED[case]
    # Short only where the timeout is the case: elsewhere a stall of a loaded machine between
    # accept and the first read must not turn the expected answer into a 408.
    header_read_timeout = 0.3 if code == "client_timeout" else TEST_SERVER.header_read_timeout
    parkway = await start_parkway(max_header_bytes=1024, header_read_timeout=header_read_timeout)

    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", parkway.port) as stream:
            await stream.send_all(data)
            response, closed = await read_response(stream, close_within=3.0)

    assert response.status == status, response.body
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code
    assert closed, "Parkway kept the connection open after a protocol error"
    assert upstream.requests == []
    # The server goes on serving.
    after = await client.get(parkway.sign(f"{upstream.base}/v1/models"))
    assert after.status_code == 200


async def test_silent_connection_is_closed_after_header_read_timeout(start_parkway, upstream, client):
    parkway = await start_parkway(header_read_timeout=0.3)

    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", parkway.port) as stream:
            assert await read_until_eof(stream) == b""

    assert (await client.get(parkway.sign(f"{upstream.base}/v1/models"))).status_code == 200


# --- connections ----------------------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(parkway, upstream, client):
    first = await client.get(parkway.sign(f"{upstream.base}/v1/models?n=1"))
    second = await client.get(parkway.sign(f"{upstream.base}/v1/models?n=2"))

    assert first.status_code == second.status_code == 200
    first_port = first.extensions["network_stream"].get_extra_info("client_addr")[1]
    second_port = second.extensions["network_stream"].get_extra_info("client_addr")[1]
    assert first_port == second_port
    assert parkway.parkway.server.open_connections == 1
    # Parkway's own upstream pool keeps its connection alive too.
    assert upstream.connections == 1
    assert upstream.requests[0].peer_port == upstream.requests[1].peer_port


async def test_graceful_drain_finishes_in_flight_streams(start_parkway, upstream, client):
    parkway = await start_parkway(drain_timeout=5.0)
    send, receive = trio.open_memory_channel[bytes](0)
    upstream.behaviour = sse_from(receive)
    url = parkway.sign(f"{upstream.base}/v1/chat/completions", method="POST")

    async with (
        send,
        client.stream("POST", url, json={"stream": True}) as response,
        aclosing(response.aiter_raw()) as chunks,
    ):
        await send.send(EVENT_1)
        with trio.fail_after(5):
            got = await read_exactly(chunks, len(EVENT_1))

        parkway.parkway.shutdown()
        await trio.testing.wait_all_tasks_blocked()  # the accept loop has stopped, the listener closed
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", parkway.port)

        await send.send(EVENT_2)
        await send.aclose()
        async for chunk in chunks:
            got += chunk

    assert got == EVENT_1 + EVENT_2
    with trio.fail_after(5):
        await parkway.stopped.wait()


async def test_drain_timeout_cuts_streams_that_outlive_it(start_parkway, upstream, client):
    parkway = await start_parkway(drain_timeout=0.2)
    send, receive = trio.open_memory_channel[bytes](0)
    upstream.behaviour = sse_from(receive)
    url = parkway.sign(f"{upstream.base}/v1/chat/completions", method="POST")

    with watch_logs() as logs:
        async with (
            send,
            client.stream("POST", url, json={"stream": True}) as response,
            aclosing(response.aiter_raw()) as chunks,
        ):
            await send.send(EVENT_1)
            with trio.fail_after(5):
                got = await read_exactly(chunks, len(EVENT_1))
            parkway.parkway.shutdown()
            with trio.fail_after(5), pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                async for chunk in chunks:
                    got += chunk

        assert got == EVENT_1
        with trio.fail_after(5):
            await parkway.stopped.wait()
            await upstream.disconnected.wait()
            # The cut stream is logged as cancelled, not as a success.
            line = await logs.wait_for(event="request", upstream_path="/v1/chat/completions")
    assert line["outcome"] == "cancelled" and line["status"] == 200


# --- logs -----------------------------------------------------------------------------------------


async def test_secrets_are_never_logged(parkway, upstream, client):
    with watch_logs() as logs:
        refused = await client.get(parkway.sign(f"{upstream.base}/v1/models", secret="wrong"))
        accepted = await client.post(
            parkway.sign(f"{upstream.base}/v1/chat", method="POST", body='{"q":1}'),
            content=b'{"q":1}',
            headers={"Authorization": "Bearer client-supplied"},
        )
        with trio.fail_after(5):
            ok = await logs.wait_for(event="request", outcome="ok")
            bad = await logs.wait_for(event="request", outcome="refused:signature_mismatch")

    assert refused.status_code == 403 and accepted.status_code == 200
    assert ok["credential"] == bad["credential"] == "app"
    text = repr(logs.entries)
    assert SECRET not in text
    assert UPSTREAM_KEY not in text


async def test_request_fields_do_not_leak_into_the_next_request_on_the_connection(parkway, upstream, client):
    """credential (and user) are bound per request; a kept-alive connection's next request,
    refused before its credential is known, must not be logged under the previous one."""
    with watch_logs() as logs:
        first = await client.get(parkway.sign(f"{upstream.base}/v1/models"))
        second = await client.get(f"{parkway.base}/no-signature-here")
        with trio.fail_after(5):
            ok = await logs.wait_for(event="request", outcome="ok")
            refused = await logs.wait_for(event="request", outcome="refused:missing_signature_params")
    assert first.status_code == 200 and second.status_code == 400
    assert ok["credential"] == "app"
    assert refused.get("credential") is None
    assert ok["request_id"] != refused["request_id"]


async def test_a_malformed_head_after_a_request_is_not_logged_under_its_credential(parkway, upstream):
    """The server refuses a bad head outside any request; the previous request's fields must be
    unbound by then (its request id and credential are not that line's)."""
    first = request_bytes("GET", parkway.sign(f"{upstream.base}/v1/models"))
    with watch_logs() as logs:
        with trio.fail_after(5):
            async with await trio.open_tcp_stream("127.0.0.1", parkway.port) as stream:
                await stream.send_all(first + b"NOT HTTP AT ALL\r\n\r\n")
                raw = await read_until_eof(stream)
            ok = await logs.wait_for(event="request", outcome="ok")
            refused = await logs.wait_for(event="request", outcome="refused:malformed_http")
    assert raw.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 400 " in raw
    assert ok["credential"] == "app"
    assert refused.get("credential") is None and refused["request_id"] != ok["request_id"]


# --- lifecycle ------------------------------------------------------------------------------------


async def test_cancelled_parkway_releases_its_port(contain_crashes):
    """Cancelling ``Parkway.run`` (a second SIGINT, an embedding nursery) must close its listeners."""
    parkway = Parkway(make_config())
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            (address,) = await nursery.start(parkway.run)
            nursery.cancel_scope.cancel()
    port = int(address.rpartition(":")[2])

    try:
        with trio.fail_after(5), pytest.raises(OSError):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()  # connected: the listening socket is still open
    finally:
        gc.collect()  # a leaked listener's ResourceWarning belongs to this test
