"""proxy.websocket.policy: WebSocket decisions as tables (no sockets)."""

from __future__ import annotations

import json

import pytest
import wsproto
from wsproto.events import Request

from proxy.errors import BadRequest, Forbidden
from proxy.forwarding import ForwardContext
from proxy.relay.usage import Usage
from proxy.websocket import policy as ws_policy
from proxy.websocket.policy import (
    CLIENT,
    UPSTREAM,
    Closing,
    Ending,
    MessageBudget,
    check_handshake,
    check_origin,
    decide_close,
    handshake_request,
    http_form,
    is_websocket_request,
    message_size,
    parse_subprotocols,
    sendable,
    split_subprotocols,
    upstream_headers,
    upstream_target,
)

GOOD = {
    "host": "parkway.example",
    "upgrade": "websocket",
    "connection": "Upgrade",
    "sec-websocket-version": "13",
    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
}


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("GET", {"upgrade": "websocket"}, True),
        ("GET", {"upgrade": "WebSocket"}, True),
        ("GET", {"upgrade": "h2c, websocket"}, True),
        ("POST", {"upgrade": "websocket"}, False),
        ("GET", {"upgrade": "h2c"}, False),
        ("GET", {}, False),
    ],
)
def test_is_websocket_request(method: str, headers: dict[str, str], expected: bool) -> None:
    assert is_websocket_request(method, headers) is expected


@pytest.mark.parametrize(
    ("version", "change", "names"),
    [
        ("1.0", {}, "HTTP/1.1"),
        ("1.1", {"upgrade": "websocket, h2c"}, "Upgrade"),
        ("1.1", {"connection": "keep-alive"}, "Connection"),
        ("1.1", {"sec-websocket-version": "8"}, "Sec-WebSocket-Version"),
        ("1.1", {"sec-websocket-key": ""}, "Sec-WebSocket-Key"),
        ("1.1", {"content-length": "5"}, "no body"),
        ("1.1", {"transfer-encoding": "chunked"}, "no body"),
    ],
)
def test_check_handshake_names_the_wrong_header(version: str, change: dict[str, str], names: str) -> None:
    with pytest.raises(BadRequest) as caught:
        check_handshake(version, {**GOOD, **change})
    assert caught.value.code == "bad_websocket_handshake"
    assert names in caught.value.message


def test_a_handshake_that_passes_the_check_is_one_wsproto_accepts() -> None:
    check_handshake("1.1", {**GOOD, "connection": "keep-alive, Upgrade"})
    headers = [(n.encode(), v.encode()) for n, v in {**GOOD, "connection": "keep-alive, Upgrade"}.items()]
    server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    server.receive_data(handshake_request("/?X-Sw-Date=1", headers))
    (request,) = server.events()
    assert isinstance(request, Request)
    assert request.target == "/?X-Sw-Date=1"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "wss://api.openai.com/v1/realtime?model=gpt-realtime",
            ("wss://api.openai.com/v1/realtime?model=gpt-realtime", True, "api.openai.com", 443, "api.openai.com"),
        ),
        (
            "https://api.openai.com/v1/realtime",
            ("wss://api.openai.com/v1/realtime", True, "api.openai.com", 443, "api.openai.com"),
        ),
        ("http://127.0.0.1:8080/ws", ("ws://127.0.0.1:8080/ws", False, "127.0.0.1", 8080, "127.0.0.1:8080")),
        ("ws://[::1]:9000/", ("ws://[::1]:9000/", False, "::1", 9000, "[::1]:9000")),
        ("ws://user:pw@h.example/x#frag", ("ws://h.example/x", False, "h.example", 80, "h.example")),
    ],
)
def test_upstream_target(url: str, expected: tuple[str, bool, str, int, str]) -> None:
    target = upstream_target(url)
    assert (target.url, target.tls, target.host, target.port, target.host_header) == expected
    assert target.url.endswith(target.resource)


def test_upstream_target_refuses_other_schemes() -> None:
    with pytest.raises(BadRequest):
        upstream_target("ftp://h.example/")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("wss://h.example/v1/realtime", "https://h.example/v1/realtime"),
        ("WS://h.example/", "http://h.example/"),
        ("https://h.example/", "https://h.example/"),
        ("no-scheme", "no-scheme"),
    ],
)
def test_http_form(url: str, expected: str) -> None:
    assert http_form(url) == expected


def test_upstream_headers_inject_the_credential_and_drop_per_hop_and_browser_headers() -> None:
    client = [
        (b"host", b"parkway.example"),
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-key", b"k"),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-protocol", b"realtime"),
        (b"sec-websocket-extensions", b"permessage-deflate"),
        (b"origin", b"https://app.example"),
        (b"cookie", b"session=1"),
        (b"authorization", b"Bearer from-the-browser"),
        (b"user-agent", b"test"),
        (b"x-sw-anything", b"1"),
    ]
    out = upstream_headers(
        client,
        (("Authorization", "Bearer sk-real"), ("OpenAI-Beta", "realtime=v1")),
        ForwardContext(client_ip="10.0.0.1", forwarded_for="10.0.0.1"),
    )
    assert out == [
        (b"user-agent", b"test"),
        (b"authorization", b"Bearer sk-real"),
        (b"openai-beta", b"realtime=v1"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"x-forwarded-proto", b"http"),
    ]


@pytest.mark.parametrize(
    ("header", "kept", "dropped"),
    [
        (None, (), 0),
        ("realtime", ("realtime",), 0),
        (
            "realtime, openai-insecure-api-key.sk-abc, openai-beta.realtime-v1",
            ("realtime", "openai-beta.realtime-v1"),
            1,
        ),
        ("OpenAI-Insecure-API-Key.sk-abc,openai-insecure-api-key.sk-def", (), 2),
        (" a ,, b ", ("a", "b"), 0),
    ],
)
def test_key_carrying_subprotocols_are_dropped_and_only_counted(
    header: str | None, kept: tuple[str, ...], dropped: int
) -> None:
    assert split_subprotocols(parse_subprotocols(header)) == (kept, dropped)


@pytest.mark.parametrize(
    "header",
    [
        "realtime openai-insecure-api-key.sk-abc",  # a space inside an element: one "token" hiding the key
        "realtime;openai-insecure-api-key.sk-abc",
        "realtime, openai-insecure-api-key.sk-abc;q=1",
        '"openai-insecure-api-key.sk-abc"',  # a quoted string is not a token
        "realtime, a/b",
        "réaltime",
    ],
)
def test_a_malformed_subprotocol_list_is_refused_without_its_value(header: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_subprotocols(header)
    assert caught.value.code == "bad_websocket_handshake" and "Sec-WebSocket-Protocol" in caught.value.message
    assert "sk-abc" not in caught.value.message
    headers = {**GOOD, "sec-websocket-protocol": header}
    with pytest.raises(BadRequest):
        check_handshake("1.1", headers)


def test_a_message_budget_counts_bytes_and_frames_before_anything_is_kept() -> None:
    budget = MessageBudget(max_bytes=10, max_frames=3)
    assert budget.add(4) is None and budget.add(0) is None and budget.add(6, frame_finished=False) is None
    assert budget.add(1) == "message above 10 bytes"  # nothing added past the bound
    assert (budget.bytes, budget.frames, budget.peak) == (10, 2, 10)
    assert budget.add(0) is None  # the frame the 6 bytes began: now 3 frames
    assert budget.add(0) == "message in more than 3 frames"  # an empty frame counts
    budget.reset()
    assert (budget.bytes, budget.frames, budget.peak) == (0, 0, 10)


@pytest.mark.parametrize(
    ("allowed", "origin", "ok"),
    [
        (("*",), "https://evil.example", True),
        (("https://app.example",), "https://app.example", True),
        (("https://app.example",), None, True),
        (("https://app.example",), "https://evil.example", False),
        ((), "https://app.example", False),
    ],
)
def test_check_origin(allowed: tuple[str, ...], origin: str | None, ok: bool) -> None:
    if ok:
        check_origin(allowed, origin)
    else:
        with pytest.raises(Forbidden) as caught:
            check_origin(allowed, origin)
        assert caught.value.code == "origin_not_allowed"
        assert origin in caught.value.message


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (1000, "done", (1000, "done")),
        (4000, "custom", (4000, "custom")),
        (4999, None, (4999, None)),
        (3001, "app", (3001, "app")),
        (1005, None, (1000, None)),
        (1006, "gone", (1011, "gone")),
        (1015, "tls", (1011, "tls")),
    ],
)
def test_sendable(code: int, reason: str | None, expected: tuple[int, str | None]) -> None:
    assert sendable(code, reason) == expected


LIMITS = {"idle_timeout": 30.0, "max_duration": 600.0, "max_message_size": 1024}

CLOSES = [
    # the client closes: its code goes upstream as is
    (Ending(CLIENT, 4001, "bye"), Closing(None, (4001, "bye"), "ok", "client")),
    (Ending(CLIENT, 1005), Closing(None, (1000, None), "ok", "client")),
    (Ending(CLIENT, 1006), Closing(None, (1001, "client went away"), "client_gone", "client")),
    (
        Ending(CLIENT, 1009, "message above 1024 bytes", overflow=True),
        Closing(None, (1001, "client sent a message above 1024 bytes"), "message_too_big", "parkway", "warning"),
    ),
    (
        Ending(CLIENT, 1009, "message in more than 8 frames", overflow=True),
        Closing(None, (1001, "client sent a message in more than 8 frames"), "message_too_big", "parkway", "warning"),
    ),
    # the upstream closes: its code goes to the client as is, failures are errors
    (Ending(UPSTREAM, 4000, "custom"), Closing((4000, "custom"), None, "ok", "upstream")),
    (Ending(UPSTREAM, 1000), Closing((1000, None), None, "ok", "upstream")),
    (Ending(UPSTREAM, 1011, "boom"), Closing((1011, "boom"), None, "upstream_error", "upstream", "error")),
    (Ending(UPSTREAM, 1006), Closing((1011, "upstream connection lost"), None, "upstream_error", "upstream", "error")),
    (
        Ending(UPSTREAM, 1009, "message above 1024 bytes", overflow=True),
        Closing((1009, "upstream sent a message above 1024 bytes"), None, "message_too_big", "parkway", "warning"),
    ),
    # the upstream's own 1009 (its limit, for what the client sent): its code and words, not Parkway's
    (
        Ending(UPSTREAM, 1009, "Exceeded maximum message size: 1000 bytes"),
        Closing((1009, "Exceeded maximum message size: 1000 bytes"), None, "ok", "upstream"),
    ),
    # Parkway ends it
    (
        Ending(why="idle_timeout"),
        Closing((1001, "no message for 30 s"), (1001, "no message for 30 s"), "idle_timeout", "parkway"),
    ),
    (
        Ending(why="max_duration"),
        Closing(
            (1001, "session reached its maximum of 600 s"),
            (1001, "session reached its maximum of 600 s"),
            "max_duration",
            "parkway",
        ),
    ),
    (
        Ending(why="cancelled"),
        Closing((1001, "server shutting down"), (1001, "server shutting down"), "cancelled", "parkway", "warning"),
    ),
]


@pytest.mark.parametrize(("ending", "expected"), CLOSES)
def test_decide_close(ending: Ending, expected: Closing) -> None:
    assert decide_close(ending, **LIMITS) == expected


@pytest.mark.parametrize(
    ("message", "size"), [("", 0), ("abc", 3), ("é", 2), ("€uro", 6), (b"\x00\xff", 2), ("a" * 1000, 1000)]
)
def test_message_size_counts_utf8_bytes(message: str | bytes, size: int) -> None:
    assert message_size(message) == size


def _done(usage: dict[str, object] | None, **extra: object) -> str:
    response: dict[str, object] = {"id": "resp_1", "status": "completed"}
    if usage is not None:
        response["usage"] = usage
    return json.dumps({"event_id": "event_1", "type": "response.done", "response": response, **extra})


def test_realtime_usage_sums_every_response_done() -> None:
    usage = ws_policy.RealtimeUsage()
    assert usage.usage is None
    usage.feed(json.dumps({"type": "response.output_audio.delta", "delta": "A" * 10000}))
    usage.feed(_done({"total_tokens": 30, "input_tokens": 20, "output_tokens": 10}))
    usage.feed(_done({"input_tokens": 5, "output_tokens": 1}))
    assert usage.usage == Usage(25, 11, 36)


@pytest.mark.parametrize(
    "message",
    [
        'not json but mentions "response.done"',
        _done(None),
        _done({"input_tokens": "5", "output_tokens": 1}),
        json.dumps({"type": "response.created", "note": "response.done"}),
        json.dumps(["response.done"]),
        # "type" beyond the head is not looked at (a large field first): documented limit
        json.dumps(
            {"blob": "x" * 300, "type": "response.done", "response": {"usage": {"input_tokens": 1, "output_tokens": 1}}}
        ),
    ],
)
def test_realtime_usage_ignores_what_is_not_a_usage_report(message: str) -> None:
    usage = ws_policy.RealtimeUsage()
    usage.feed(message)
    assert usage.usage is None


def test_defaults_allow_realtime_audio_frames() -> None:
    settings = ws_policy.WebSocketConfig()
    assert settings.max_message_size >= 16 * 1024 * 1024
    assert settings.message_queue_size >= 1
