"""WebSocket sessions through a running Parkway: signed, verified before the upgrade, relayed,
and the same behind a real nginx running the shipped snippet.

The upstream is the Realtime API stand-in (``support.websocket``), the client trio-websocket;
URLs are signed by the real ``signway_sdk`` (or Parkway's signer for extra parameters).
Refusal tests assert that the upstream saw nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from proxy.config import CorsConfig, Credential
from proxy.limits import BudgetSpec, LimitSpec
from proxy.websocket.policy import WebSocketConfig
from support.http import call, parse_response, send_raw
from support.logs import watch_logs
from support.metrics import parse_metrics
from support.nginx import render_nginx_conf, serve_nginx
from support.parkway import TEST_CREDENTIAL, RunningParkway
from support.processes import free_port
from support.signing import SECRET, UPSTREAM_KEY, sign
from support.websocket import USAGE, RealtimeUpstream, UpstreamSession, event, raw_server, ws_client

HANG_LIMIT = 15.0
WAIT = 5.0
ORIGIN = "https://app.example.com"
KEY_PROTOCOL = "openai-insecure-api-key.sk-browser-held-key-4242"


@pytest.fixture
async def realtime(nursery: trio.Nursery, hang_guard: None) -> RealtimeUpstream:
    return await nursery.start(RealtimeUpstream().serve)


def resource(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def open_session(parkway: RunningParkway, url: str, **kw: Any) -> Any:
    headers = kw.pop("headers", [(b"origin", ORIGIN.encode())])
    return ws_client(parkway.port, resource(url), headers=headers, **kw)


async def refused(parkway: RunningParkway, url: str, **kw: Any) -> ConnectionRejected:
    with trio.fail_after(WAIT), pytest.raises(ConnectionRejected) as caught:
        async with open_session(parkway, url, **kw):
            pass
    return caught.value


def error_of(rejected: ConnectionRejected) -> dict[str, str]:
    return json.loads(rejected.body or b"")["error"]


def header(rejected: ConnectionRejected, name: str) -> str | None:
    return next((v.decode() for n, v in rejected.headers if n.decode().lower() == name), None)


@pytest.mark.parametrize("scheme", ["ws", "http"])  # SDKs sign http(s) URLs; they mean the same
async def test_a_signed_session_relays_both_ways_with_the_injected_key(
    start_parkway: Callable[..., Any], realtime: RealtimeUpstream, scheme: str
) -> None:
    parkway = await start_parkway()
    url = parkway.sign(realtime.url.replace("ws://", f"{scheme}://"))
    with watch_logs() as logs:
        with trio.fail_after(WAIT):
            async with open_session(parkway, url, subprotocols=["realtime", KEY_PROTOCOL]) as ws:
                assert ws.subprotocol == "realtime"
                assert json.loads(await ws.get_message())["type"] == "session.created"
                await ws.send_message("ping?")
                assert await ws.get_message() == "ping?"
                await ws.send_message(b"\x00\xffbinary")
                assert await ws.get_message() == b"\x00\xffbinary"
                await ws.send_message(event("response.create"))
                for _ in range(4):
                    last = json.loads(await ws.get_message())
                assert last["type"] == "response.done"
            line = await logs.wait_for(event="request", status=101)
    session = realtime.sessions[0]
    assert session.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert session.subprotocols == ("realtime",)  # the key-carrying one was dropped
    assert session.path == "/v1/realtime?model=gpt-realtime"
    assert "origin" not in session.headers and "cookie" not in session.headers
    assert (line["outcome"], line["closed_by"], line["client_close_code"], line["upstream_close_code"]) == (
        "ok",
        "client",
        1000,
        1000,
    )
    assert (line["messages_from_client"], line["messages_from_upstream"]) == (3, 7)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (USAGE["input_tokens"], USAGE["output_tokens"])
    assert line["subprotocol"] == "realtime" and line["credential"] == "app"
    (dropped,) = logs.find(event="websocket_key_subprotocol_dropped")
    assert dropped["count"] == 1
    assert "4242" not in repr(logs.entries)  # the browser's key is in no log line
    metrics = parse_metrics(parkway.parkway.metrics.render().decode())
    assert metrics[("parkway_websocket_sessions_total", frozenset({("credential", "app"), ("outcome", "ok")}))] == 1
    assert metrics[("parkway_websocket_messages_total", frozenset({("direction", "from_upstream")}))] == 7
    assert metrics[("parkway_tokens_total", frozenset({("credential", "app"), ("kind", "prompt")}))] == 11


REFUSALS: dict[str, tuple[dict[str, Any], dict[str, Any], int, str]] = {
    # name: (parkway settings, how the URL is signed / opened, status, code)
    "expired": ({}, {"when": datetime.now(UTC) - timedelta(hours=1)}, 403, "expired"),
    "wrong secret": ({}, {"secret": "not-the-secret"}, 403, "signature_mismatch"),
    "unknown credential": ({}, {"id": "nobody"}, 401, "unknown_credential"),
    "upstream not allowed": (
        {"credentials": (Credential("app", (SECRET,), allowed_upstreams=("https://api.openai.com/v1/",)),)},
        {},
        403,
        "upstream_not_allowed",
    ),
    "method not allowed": (
        {"credentials": (Credential("app", (SECRET,), allowed_methods=("POST",)),)},
        {},
        403,
        "method_not_allowed",
    ),
    "origin not allowed": (
        {"cors": CorsConfig(allow_origins=(ORIGIN,))},
        {"origin": "https://evil.example"},
        403,
        "origin_not_allowed",
    ),  # fmt: skip
    "private upstream": ({"allow_private_upstreams": False}, {}, 403, "upstream_address_refused"),
    "under a usd budget": (
        {"credentials": (Credential("app", (SECRET,), budget=BudgetSpec(1000, "usd", "day")),)},
        {},
        403,
        "budget_unmetered",
    ),
}


@pytest.mark.parametrize("name", REFUSALS)
async def test_a_refused_handshake_is_a_json_error_with_cors_and_the_upstream_sees_nothing(
    start_parkway: Callable[..., Any], realtime: RealtimeUpstream, name: str
) -> None:
    settings, how, status, code = REFUSALS[name]
    parkway = await start_parkway(**settings)
    origin = how.pop("origin", ORIGIN)
    url = parkway.sign(realtime.url, **how)
    rejected = await refused(parkway, url, headers=[(b"origin", origin.encode())])
    assert (rejected.status_code, error_of(rejected)["code"]) == (status, code)
    assert header(rejected, "content-type") == "application/json"
    if code == "origin_not_allowed":  # a page from elsewhere may not read it either
        assert header(rejected, "access-control-allow-origin") is None
    else:
        assert header(rejected, "access-control-allow-origin") in ("*", origin)
    assert realtime.handshakes == []


async def test_the_upstreams_refusal_is_a_502_and_its_body_stays_there(
    start_parkway: Callable[..., Any], realtime: RealtimeUpstream
) -> None:
    credential = Credential("app", (SECRET,), (("Authorization", "Bearer sk-wrong-key-xqzv"),))
    parkway = await start_parkway(credentials=(credential,))
    rejected = await refused(parkway, parkway.sign(realtime.url))
    assert (rejected.status_code, error_of(rejected)["code"]) == (502, "upstream_websocket_refused")
    body = rejected.body or b""
    assert b"Incorrect API key" not in body and b"xqzv" not in body  # the upstream's body stays there
    assert len(realtime.handshakes) == 1 and realtime.sessions == []


async def test_concurrency_limits_count_open_sessions(
    start_parkway: Callable[..., Any], realtime: RealtimeUpstream
) -> None:
    limited = Credential("app", (SECRET,), TEST_CREDENTIAL.headers, limits=LimitSpec(max_concurrent=1))
    parkway = await start_parkway(credentials=(limited,))
    url = parkway.sign(realtime.url)
    with watch_logs() as logs, trio.fail_after(WAIT):
        async with open_session(parkway, url) as first:
            await first.get_message()
            rejected = await refused(parkway, url)
            assert (rejected.status_code, error_of(rejected)["code"]) == (429, "credential_concurrency_limit")
            assert header(rejected, "retry-after") is not None
        await logs.wait_for(event="request", status=101)  # logged once its slot is given back
        async with open_session(parkway, url) as again:
            await again.get_message()
    assert len(realtime.handshakes) == 2


async def test_user_concurrency_limits_count_open_sessions(
    start_parkway: Callable[..., Any], realtime: RealtimeUpstream
) -> None:
    per_user = Credential("app", (SECRET,), TEST_CREDENTIAL.headers, user_limits=LimitSpec(max_concurrent=1))
    parkway = await start_parkway(credentials=(per_user,))
    alice, bob = (sign(parkway.base, realtime.url, signer="proxy.signing", params={"pw_user": u}) for u in "ab")
    with trio.fail_after(WAIT):
        async with open_session(parkway, alice) as first:
            await first.get_message()
            rejected = await refused(parkway, alice)
            assert (rejected.status_code, error_of(rejected)["code"]) == (429, "user_concurrency_limit")
            async with open_session(parkway, bob) as other:  # another user of the same credential
                await other.get_message()
    assert len(realtime.handshakes) == 2


async def test_a_single_use_url_opens_one_session(
    start_parkway: Callable[..., Any], realtime: RealtimeUpstream
) -> None:
    parkway = await start_parkway()
    url = sign(parkway.base, realtime.url, signer="proxy.signing", params={"pw_single_use": "1", "pw_user": "u1"})
    with trio.fail_after(WAIT):
        async with open_session(parkway, url) as ws:
            await ws.get_message()
        rejected = await refused(parkway, url)
    assert (rejected.status_code, error_of(rejected)["code"]) == (403, "already_used")
    assert len(realtime.handshakes) == 1


async def test_a_websocket_url_is_refused_for_plain_http(
    start_parkway: Callable[..., Any], realtime: RealtimeUpstream
) -> None:
    parkway = await start_parkway()
    reply = await call(parkway.port, "GET", parkway.sign(realtime.url))
    assert (reply.status, reply.code) == (400, "websocket_required")
    assert realtime.handshakes == []


async def test_a_malformed_handshake_is_refused_before_the_upstream(
    start_parkway: Callable[..., Any], realtime: RealtimeUpstream
) -> None:
    parkway = await start_parkway()
    head = (
        f"GET {resource(parkway.sign(realtime.url))} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Connection: close\r\n\r\n"
    )
    _, raw = await send_raw(parkway.port, head.encode())
    reply = parse_response(raw)
    assert (reply.status, reply.code) == (400, "bad_websocket_handshake")
    assert "Sec-WebSocket-Version must be 13" in reply.message
    assert realtime.handshakes == []


@pytest.mark.parametrize("separator", [" ", ";", ";q=1, "])
async def test_a_key_hidden_in_a_malformed_subprotocol_list_is_refused_not_forwarded(
    start_parkway: Callable[..., Any], realtime: RealtimeUpstream, separator: str
) -> None:
    """Issue 19: ``realtime openai-insecure-api-key.sk-…`` is no token list; it must never reach the upstream."""
    parkway = await start_parkway()
    head = (
        f"GET {resource(parkway.sign(realtime.url))} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Origin: {ORIGIN}\r\nSec-WebSocket-Protocol: realtime{separator}{KEY_PROTOCOL}\r\n\r\n"
    )
    _, raw = await send_raw(parkway.port, head.encode())
    reply = parse_response(raw)
    assert (reply.status, reply.code) == (400, "bad_websocket_handshake")
    assert "Sec-WebSocket-Protocol" in reply.message and "4242" not in raw.decode("latin-1")
    assert realtime.handshakes == []


async def test_close_codes_pass_both_ways_through_parkway(
    start_parkway: Callable[..., Any], realtime: RealtimeUpstream, nursery: trio.Nursery
) -> None:
    parkway = await start_parkway()
    with trio.fail_after(WAIT):
        async with open_session(parkway, parkway.sign(realtime.url)) as ws:
            await ws.get_message()
            await ws.aclose(4003, "bye from the page")
        session = await realtime.wait_session()
        await session.ended.wait()
    assert session.close is not None and (session.close.code, session.close.reason) == (4003, "bye from the page")

    async def close_4000(session: UpstreamSession) -> None:
        await session.ws.aclose(4000, "session expired")

    other = await nursery.start(RealtimeUpstream(close_4000).serve)
    with trio.fail_after(WAIT):
        async with open_session(parkway, parkway.sign(other.url)) as ws:
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
    assert caught.value.reason is not None
    assert (caught.value.reason.code, caught.value.reason.reason) == (4000, "session expired")


async def test_an_upstream_that_vanishes_is_a_1011_and_an_error_line(
    start_parkway: Callable[..., Any], nursery: trio.Nursery, hang_guard: None
) -> None:
    from support.websocket import accept_raw

    async def vanish(stream: trio.SocketStream) -> None:
        await accept_raw(stream)
        await stream.aclose()

    port = await nursery.start(raw_server, vanish)
    parkway = await start_parkway()
    with watch_logs() as logs, trio.fail_after(WAIT):
        async with open_session(parkway, parkway.sign(f"ws://127.0.0.1:{port}/v1/realtime")) as ws:
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
        line = await logs.wait_for(event="request", status=101)
    assert caught.value.reason is not None and caught.value.reason.code == 1011
    assert (line["outcome"], line["log_level"]) == ("upstream_error", "error")
    metrics = parse_metrics(parkway.parkway.metrics.render().decode())
    labels = frozenset({("credential", "app"), ("outcome", "upstream_error")})
    assert metrics[("parkway_websocket_sessions_total", labels)] == 1


async def test_an_oversized_message_is_1009_with_the_configured_limit(
    start_parkway: Callable[..., Any], realtime: RealtimeUpstream
) -> None:
    parkway = await start_parkway(websocket=WebSocketConfig(max_message_size=4096))
    with trio.fail_after(WAIT):
        async with open_session(parkway, parkway.sign(realtime.url)) as ws:
            await ws.get_message()
            await ws.send_message("x" * 4097)
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
        await realtime.sessions[0].ended.wait()
    assert caught.value.reason is not None and caught.value.reason.code == 1009
    assert realtime.sessions[0].received == []


async def test_a_session_outlives_request_timeout_and_a_drain_closes_it_with_1001(
    start_parkway: Callable[..., Any], realtime: RealtimeUpstream
) -> None:
    parkway = await start_parkway(request_timeout=0.3, drain_timeout=0.5)
    with trio.fail_after(WAIT):
        async with open_session(parkway, parkway.sign(realtime.url)) as ws:
            await ws.get_message()
            await trio.sleep(0.6)  # past request_timeout: the session's own limits apply
            await ws.send_message("still here")
            assert await ws.get_message() == "still here"
            parkway.parkway.shutdown()
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
    assert caught.value.reason is not None
    assert (caught.value.reason.code, caught.value.reason.reason) == (1001, "server shutting down")


# --- behind nginx with the shipped snippet -------------------------------------------------------------


@pytest.fixture
async def behind_nginx(
    nursery: trio.Nursery, tmp_path: Any, start_parkway: Callable[..., Any]
) -> tuple[RunningParkway, int]:
    """Parkway behind a real nginx running the shipped snippet (as shipped: /ai passed on)."""
    parkway = await start_parkway()
    port = free_port()
    conf = render_nginx_conf(
        tmp_path / "nginx", listen_port=port, parkway_address=parkway.addresses[0], strip_prefix=False
    )
    await nursery.start(serve_nginx, tmp_path / "nginx", conf, port)
    return parkway, port


async def test_a_session_through_nginx_with_the_shipped_snippet(
    behind_nginx: tuple[RunningParkway, int], realtime: RealtimeUpstream
) -> None:
    parkway, port = behind_nginx
    url = sign(f"http://127.0.0.1:{port}/ai", realtime.url)  # the public URL, as a backend signs it
    with watch_logs() as logs, trio.fail_after(WAIT):
        async with ws_client(port, resource(url), subprotocols=["realtime"], max_message_size=8 << 20) as ws:
            assert ws.subprotocol == "realtime"
            assert json.loads(await ws.get_message())["type"] == "session.created"
            big = "a" * (3 << 20)  # several MiB through nginx's buffers, both ways
            await ws.send_message(big)
            assert await ws.get_message() == big
            await ws.aclose(4001, "done")
        session = await realtime.wait_session()
        await session.ended.wait()
        line = await logs.wait_for(event="request", status=101)
    assert session.close is not None and (session.close.code, session.close.reason) == (4001, "done")
    assert session.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert line["outcome"] == "ok" and line["bytes_from_client"] == 3 << 20
    assert type(line["client_close_code"]) is int and line["client_close_code"] == 4001


async def test_a_refusal_through_nginx_keeps_its_json(
    behind_nginx: tuple[RunningParkway, int], realtime: RealtimeUpstream
) -> None:
    _parkway, port = behind_nginx
    url = sign(f"http://127.0.0.1:{port}/ai", realtime.url, secret="wrong")
    with trio.fail_after(WAIT), pytest.raises(ConnectionRejected) as caught:
        async with ws_client(port, resource(url)):
            pass
    assert (caught.value.status_code, error_of(caught.value)["code"]) == (403, "signature_mismatch")
    assert realtime.handshakes == []
