"""proxy.forwarding: header policy in both directions, table-driven (h11's ``test_io.py`` style).

Client header names arrive lower-cased (h11 does that); injected names are as written in
the config; upstream names may have any case. Every expected list is written out in full,
so a header that leaks through, goes missing or moves shows up in the diff.
"""

from __future__ import annotations

import pytest

from proxy.forwarding import ForwardContext, is_event_stream, request_headers, response_headers, response_trailers

CTX = ForwardContext(client_ip="198.51.100.9")
# What Parkway appends to every upstream request for CTX.
FORWARDED = [(b"x-forwarded-for", b"198.51.100.9"), (b"x-forwarded-proto", b"http")]

# name: (client headers, injected headers, headers sent upstream)
REQUEST_CASES = {
    "end-to-end headers kept in order": (
        [(b"accept", b"text/event-stream"), (b"content-type", b"application/json"), (b"user-agent", b"sdk/1")],
        [],
        [(b"accept", b"text/event-stream"), (b"content-type", b"application/json"), (b"user-agent", b"sdk/1")],
    ),
    "hop-by-hop dropped": (
        [
            (b"connection", b"keep-alive"),
            (b"keep-alive", b"timeout=5"),
            (b"proxy-connection", b"keep-alive"),
            (b"proxy-authorization", b"Basic Zm9vOmJhcg=="),
            (b"te", b"trailers"),
            (b"trailer", b"x-checksum"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"websocket"),
            (b"accept", b"*/*"),
        ],
        [],
        [(b"accept", b"*/*")],
    ),
    "names listed in Connection dropped": (
        [
            (b"connection", b"close, X-Debug-Token"),
            (b"connection", b" x-trace ,,"),
            (b"x-debug-token", b"abc"),
            (b"x-trace", b"1"),
            (b"x-kept", b"yes"),
        ],
        [],
        [(b"x-kept", b"yes")],
    ),
    "cookie, host, content-length and forwarding chain dropped": (
        [
            (b"host", b"parkway.example"),
            (b"cookie", b"session=app-secret"),
            (b"content-length", b"12"),
            (b"forwarded", b"for=6.6.6.6"),
            (b"x-forwarded-for", b"6.6.6.6"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"evil.example"),
            (b"x-forwarded-prefix", b"/evil"),
            (b"x-real-ip", b"6.6.6.6"),
            (b"accept", b"*/*"),
        ],
        [],
        [(b"accept", b"*/*")],
    ),
    "X-Sw-* dropped": (
        [
            (b"x-sw-signature", b"ab" * 32),
            (b"x-sw-date", b"20261120T120000Z"),
            (b"x-sw-anything", b"1"),
            (b"x-swift", b"kept: only the x-sw- prefix is Signway's"),
        ],
        [],
        [(b"x-swift", b"kept: only the x-sw- prefix is Signway's")],
    ),
    "injected header overrides the client's, case-insensitively": (
        [(b"authorization", b"Bearer client-guess"), (b"x-api-key", b"client"), (b"accept", b"*/*")],
        [("Authorization", "Bearer sk-real"), ("X-API-Key", "real")],
        [(b"accept", b"*/*"), (b"authorization", b"Bearer sk-real"), (b"x-api-key", b"real")],
    ),
    "injected header added when the client sent none": (
        [],
        [("OpenAI-Organization", "org-1")],
        [(b"openai-organization", b"org-1")],
    ),
    "Connection naming an injected header does not remove it": (
        [(b"connection", b"authorization"), (b"authorization", b"Bearer client")],
        [("Authorization", "Bearer sk-real")],
        [(b"authorization", b"Bearer sk-real")],
    ),
}


@pytest.mark.parametrize("client, injected, expected", REQUEST_CASES.values(), ids=REQUEST_CASES.keys())
def test_request_headers(client, injected, expected):
    assert request_headers(client, injected, CTX) == [*expected, *FORWARDED]


def test_request_headers_forwarded_proto_and_content_length():
    out = request_headers(
        [(b"content-length", b"999"), (b"accept", b"*/*")],
        [],
        ForwardContext(client_ip="2001:db8::1", proto="https"),
        content_length=42,
    )
    assert out == [
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"2001:db8::1"),
        (b"x-forwarded-proto", b"https"),
        (b"content-length", b"42"),
    ]


@pytest.mark.parametrize("content_length, expected", [(None, []), (0, [b"0"]), (1048576, [b"1048576"])])
def test_request_content_length_only_when_given(content_length, expected):
    out = request_headers([(b"content-length", b"5")], [], CTX, content_length=content_length)
    assert [v for n, v in out if n == b"content-length"] == expected


# name: (upstream headers, headers sent to the client)
RESPONSE_CASES = {
    "end-to-end headers kept in order, repeats too": (
        [
            (b"content-type", b"application/json"),
            (b"x-ratelimit-remaining", b"99"),
            (b"vary", b"Accept"),
            (b"content-length", b"17"),
            (b"vary", b"Origin"),
        ],
        [
            (b"content-type", b"application/json"),
            (b"x-ratelimit-remaining", b"99"),
            (b"vary", b"Accept"),
            (b"content-length", b"17"),
            (b"vary", b"Origin"),
        ],
    ),
    "hop-by-hop dropped": (
        [
            (b"connection", b"keep-alive"),
            (b"keep-alive", b"timeout=5"),
            (b"transfer-encoding", b"chunked"),
            (b"trailer", b"x-checksum"),
            (b"upgrade", b"h2c"),
            (b"proxy-authenticate", b"Basic"),
            (b"date", b"Fri, 20 Nov 2026 12:00:00 GMT"),
        ],
        [(b"date", b"Fri, 20 Nov 2026 12:00:00 GMT")],
    ),
    "names listed in Connection dropped": (
        [(b"Connection", b"X-Internal"), (b"X-Internal", b"node-7"), (b"X-Request-Id", b"req_1")],
        [(b"x-request-id", b"req_1")],
    ),
    "cookies dropped, any case": (
        [
            (b"Set-Cookie", b"__cf_bm=abc; Domain=.openai.com"),
            (b"set-cookie2", b"old=1"),
            (b"Content-Type", b"text/event-stream"),
        ],
        [(b"content-type", b"text/event-stream")],
    ),
}


@pytest.mark.parametrize("upstream, expected", RESPONSE_CASES.values(), ids=RESPONSE_CASES.keys())
def test_response_headers(upstream, expected):
    assert response_headers(upstream) == expected


@pytest.mark.parametrize(
    "headers, expected",
    [
        ([(b"content-type", b"text/event-stream")], True),
        ([(b"content-type", b"text/event-stream; charset=utf-8")], True),
        ([(b"content-type", b"Text/Event-Stream")], True),
        ([(b"content-type", b"application/json")], False),
        ([(b"x-content-type", b"text/event-stream")], False),
        ([], False),
    ],
)
def test_is_event_stream(headers, expected):
    assert is_event_stream(headers) is expected


def test_trailers_follow_the_response_policy():
    lines = [b"x-usage: 7\r\n", b"Set-Cookie: s=1\r\n", b"connection: close\r\n", b"content-length: 3\r\n",
             b"server-timing: db;dur=5\r\n", b"Trailer: x\r\n"]  # fmt: skip
    assert response_trailers(lines) == [b"x-usage: 7\r\n", b"server-timing: db;dur=5\r\n"]


@pytest.mark.parametrize("upstream, expected", RESPONSE_CASES.values(), ids=RESPONSE_CASES.keys())
def test_response_headers_of_names_already_lowered(upstream, expected):
    """``lowered=True`` (a ResponseHead's names) gives what lowering them first gives."""
    lowered = [(n.lower(), v) for n, v in upstream]
    assert response_headers(lowered, lowered=True) == expected
    assert response_headers(lowered, lowered=True) is not lowered  # a list of its own: callers append to it
