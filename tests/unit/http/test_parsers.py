"""The httptools head parser against h11, the reference: the same head, framed alike."""

from __future__ import annotations

import h11
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

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
        b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n",  # not h11's request line: h11 refuses it (Illegal method characters)
        b"GET /\x80 HTTP/1.1\r\nHost: x\r\n\r\n",
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


CONTROLS = [bytes([c]) for c in [*range(0x09), *range(0x0A, 0x20), 0x7F]]


@pytest.mark.parametrize("control", CONTROLS, ids=[f"{c[0]:#04x}" for c in CONTROLS])
@pytest.mark.parametrize("where", ["start", "middle", "end", "alone"])
def test_llhttp_refuses_a_control_character_in_a_value(control: bytes, where: str) -> None:
    """What lets the connection skip h11's control-character check on a head llhttp read
    (proxy.http.connection.check_head): such a head is re-read by h11, which then refuses it."""
    value = {"start": control + b"v", "middle": b"a" + control + b"b", "end": b"v" + control, "alone": control}[where]
    with pytest.raises(parsers.HeadError):
        parsers.parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + value + b"\r\n\r\n")


# Header lines: mostly well formed, with blanks and obs-text where values may have them; now
# and then a control byte, a stray blank, a bare CR or LF, a folded line.
NAMES = [b"X-A", b"accept", b"Via", b"a"] * 4 + [b"x a", b""]
SEPARATORS = [b":", b": ", b":\t", b":  \t "] * 4 + [b" :", b""]
VALUE_PIECES = [b"v", b"w x", b"0", b" ", b"\t", b"\xe9", b":", b","] * 3 + [b"\x01", b"\x7f"]
LINE_ENDS = [b"\r\n"] * 24 + [b"\n", b"\r", b"\r\n "]


@st.composite
def header_lines(draw) -> bytes:  # type: ignore[no-untyped-def]
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        value = b"".join(draw(st.lists(st.sampled_from(VALUE_PIECES), max_size=5)))
        separator = draw(st.sampled_from(SEPARATORS))
        lines.append(draw(st.sampled_from(NAMES)) + separator + value + draw(st.sampled_from(LINE_ENDS)))
    return b"".join(lines)


@settings(max_examples=500, deadline=None)
@given(target=st.sampled_from([b"/", b"/a?b=c:d", b"/x?X-Sw-Proxy=https%3A%2F%2Fa"]), lines=header_lines())
def test_a_head_llhttp_accepts_is_read_as_h11_reads_it(target: bytes, lines: bytes) -> None:
    """The header lines of any head llhttp accepts are taken apart as h11 takes them (names
    lower-cased, values without their surrounding blanks, in order, repeats kept)."""
    data = b"POST " + target + b" HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n"
    try:
        parsed = parsers.parse_request_head(data)
    except parsers.HeadError:
        event("refused by llhttp")
        return  # h11 decides such a head (proxy.http.httptools_impl)
    event(f"accepted, {len(parsed.headers)} lines")
    reference = h11_head(data)
    assert (parsed.method, parsed.target, parsed.http_version) == (reference.method, reference.target, b"1.1")
    assert parsed.headers == list(reference.headers)
