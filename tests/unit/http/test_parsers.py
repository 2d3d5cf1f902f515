"""The httptools head parser against h11, the reference: the same head, framed alike."""

from __future__ import annotations

import h11
import pytest

from proxy.http import framing, parsers

SDK_HEAD = (
    b"POST /v1/chat?X-Sw-Algorithm=SW1-HMAC-SHA256&X-Sw-Proxy=https%3A%2F%2Fapi.example%2Fv1&X-Sw-Body=false HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8080\r\nAccept: application/json\r\nContent-Type: application/json\r\n"
    b"User-Agent: OpenAI/Python 1.54.0\r\nX-Stainless-Lang:   python  \r\nOrigin: https://app.example\r\n"
    b"Content-Length: 12\r\nConnection: keep-alive\r\nAccept: text/plain\r\n\r\n"
)
HEADS = {
    "sdk": SDK_HEAD,
    "get": b"GET /a/b?c=d%20e HTTP/1.1\r\nHost: x\r\n\r\n",
    "http-1.0": b"GET / HTTP/1.0\r\n\r\n",
    "chunked": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    "upgrade": b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n",
    "head": b"HEAD / HTTP/1.1\r\nHost: x\r\nX-Empty:\r\n\r\n",
}


def h11_head(data: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return event


@pytest.mark.parametrize("data", HEADS.values(), ids=HEADS.keys())
def test_httptools_reads_a_head_as_h11_does(data: bytes) -> None:
    reference = h11_head(data)
    parsed = parsers.parse_request_head(data)
    assert parsed.method == reference.method
    assert parsed.target == reference.target
    assert parsed.http_version == reference.http_version
    assert parsed.headers == list(reference.headers)


@pytest.mark.parametrize("data", HEADS.values(), ids=HEADS.keys())
def test_the_framing_of_an_llhttp_head_is_h11s(data: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    reference = conn.next_event()
    assert isinstance(reference, h11.Request)
    parsed = parsers.parse_request_head(data)
    decided, headers = framing.request_framing(parsed.method, parsed.target, parsed.http_version, parsed.headers)
    assert headers == list(reference.headers)
    assert decided.keep_alive == conn._cstate.keep_alive
    assert decided.expect_continue == conn.they_are_waiting_for_100_continue
    assert decided.chunked == (type(conn._reader).__name__ == "ChunkedReader")


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n",  # no blank line: incomplete
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS to a plain port
    ],
)
def test_a_malformed_head_is_a_head_error(data: bytes) -> None:
    with pytest.raises(parsers.HeadError):
        parsers.parse_request_head(data)


def test_head_end_finds_the_blank_line_as_h11_does() -> None:
    assert parsers.head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody") == len(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parsers.head_end(b"GET / HTTP/1.1\nHost: x\n\n") == len(b"GET / HTTP/1.1\nHost: x\n\n")
    assert parsers.head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") == -1


def test_auto_picks_httptools_when_installed_and_h11_when_asked() -> None:
    assert parsers.resolve("auto") == "httptools"
    assert parsers.resolve("h11") == "h11"
    assert parsers.resolve("httptools") == "httptools"


def test_asking_for_httptools_without_it_is_an_error(monkeypatch) -> None:
    monkeypatch.setattr(parsers, "httptools", None)
    assert parsers.resolve("auto") == "h11"
    with pytest.raises(ValueError, match="parkway\\[fast\\]"):
        parsers.resolve("httptools")
