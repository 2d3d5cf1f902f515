"""proxy.http.framing against h11, the oracle: the same request decisions, the same response bytes."""

from __future__ import annotations

import h11
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.http import framing

RESPONSE_HEADERS = [
    (b"content-length", b"3"),
    (b"content-length", b"3, 3"),
    (b"Content-Length", b"0"),
    (b"transfer-encoding", b"chunked"),
    (b"Transfer-Encoding", b"Chunked"),
    (b"connection", b"close"),
    (b"connection", b"keep-alive"),
    (b"Connection", b"Keep-Alive, Upgrade"),
    (b"host", b"h"),
    (b"x-a", b"1"),
    (b"content-type", b"text/plain"),
]


def h11_server(method: bytes | None, version: bytes | None, close: bool) -> h11.Connection:
    """An h11 server that read ``method``/``version`` (None: a head it refused)."""
    conn = h11.Connection(h11.SERVER)
    if method is None or version is None:
        conn.receive_data(b"\x00\r\n\r\n")
        with pytest.raises(h11.RemoteProtocolError):
            conn.next_event()
        return conn
    head = b"%s / HTTP/%s\r\nHost: x\r\n%s\r\n" % (method, version, b"Connection: close\r\n" if close else b"")
    conn.receive_data(head)
    assert isinstance(conn.next_event(), h11.Request)
    return conn


@given(
    status=st.sampled_from([200, 201, 204, 304, 400, 404, 500, 502]),
    headers=st.lists(st.sampled_from(RESPONSE_HEADERS), max_size=5),
    method=st.sampled_from([b"GET", b"HEAD", b"POST", b"CONNECT", None]),
    version=st.sampled_from([b"1.1", b"1.0"]),
    close=st.booleans(),
    body=st.sampled_from([b"", b"abc", b"abcd"]),
)
# A tunnel's and a HEAD's answer have no body whatever the headers say.
@example(status=200, headers=[(b"x-a", b"1")], method=b"CONNECT", version=b"1.1", close=False, body=b"")
@example(status=200, headers=[(b"x-a", b"1")], method=b"HEAD", version=b"1.1", close=False, body=b"")
@example(status=200, headers=[(b"content-length", b"3")], method=b"HEAD", version=b"1.1", close=False, body=b"abc")
def test_a_response_is_written_as_h11_writes_it(status, headers, method, version, close, body) -> None:
    conn = h11_server(method, version, close)
    keep_alive = conn._cstate.keep_alive  # what the request allowed
    try:
        expected: bytes | Exception = conn.send(h11.Response(status_code=status, headers=headers, reason=b"R")) or b""
    except h11.LocalProtocolError as exc:
        expected = exc
    try:
        start = framing.response_head(
            status,
            b"R",
            headers,
            request_method=method,
            client_version=None if method is None else version,
            keep_alive=keep_alive,
        )
    except framing.FramingError as exc:
        assert isinstance(expected, Exception), exc
        assert str(exc) == str(expected)
        return
    assert not isinstance(expected, Exception), expected
    assert start.head == expected
    # The body: h11's writer and framing's choice agree on the bytes and on what is refused.
    try:
        wire = (conn.send(h11.Data(data=body)) if body else b"") or b""
        wire += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:
        wire = None
    if method == b"CONNECT" and 200 <= status < 300:  # the tunnel is up: no HTTP body, no end
        ours: bytes | None = None
    elif start.body == framing.CHUNKED:
        ours = framing.frame_chunk(body) + framing.LAST_CHUNK
    elif start.body == framing.LENGTH:
        ours = body if len(body) == start.length else None
    else:
        ours = body
    assert ours == wire
    if wire is not None and method is not None:  # after a refused head h11 always closes
        assert start.keep_alive == (conn.our_state is h11.DONE)


@pytest.mark.parametrize(
    ("head", "error"),
    [
        ((b"GET", b"/", b"1.1", []), "Missing mandatory Host: header"),
        ((b"GET", b"/", b"1.1", [(b"host", b"a"), (b"host", b"b")]), "Found multiple Host: headers"),
        ((b"GET", b"/", b"1.1", [(b"host", b"a"), (b"content-length", b"1, 2")]), "conflicting Content-Length headers"),
        ((b"GET", b"/", b"1.1", [(b"host", b"a"), (b"content-length", b"x")]), "bad Content-Length"),
        ((b"GET", b"/", b"1.1", [(b"host", b"a"), (b"transfer-encoding", b"gzip")]), "Only Transfer-Encoding"),
    ],
)
def test_a_request_h11_refuses_is_refused(head, error) -> None:
    with pytest.raises(framing.FramingError, match=error):
        framing.request_framing(*head)


def test_an_answer_to_no_request_without_a_length_says_close() -> None:
    """Before any request was read the client is taken for HTTP/1.0: a body of unknown length is
    delimited by the close, which the head says and the answer's keep-alive follows."""
    conn = h11_server(None, None, False)
    expected = conn.send(h11.Response(status_code=400, headers=[(b"x-a", b"1")], reason=b"R"))
    start = framing.response_head(
        400, b"R", [(b"x-a", b"1")], request_method=None, client_version=None, keep_alive=True
    )
    assert start.head == expected == b"HTTP/1.1 400 R\r\nx-a: 1\r\nConnection: close\r\n\r\n"
    assert (start.body, start.keep_alive) == (framing.CLOSE, False)


@pytest.mark.parametrize(
    ("version", "headers", "keep_alive", "expect", "switch"),
    [
        (b"1.1", [(b"host", b"a")], True, False, False),
        (b"1.0", [], False, False, False),
        (b"1.0", [(b"connection", b"keep-alive")], False, False, False),  # h11 never keeps an HTTP/1.0 client
        (b"1.1", [(b"host", b"a"), (b"connection", b"Keep-Alive, CLOSE")], False, False, False),
        (b"1.1", [(b"host", b"a"), (b"expect", b"100-Continue")], True, True, False),
        (b"1.0", [(b"expect", b"100-continue")], False, False, False),
        (b"1.1", [(b"host", b"a"), (b"upgrade", b"websocket")], True, False, True),
        (b"1.1", [(b"host", b"a"), (b"upgrade", b" , ")], True, False, False),
    ],
)
def test_keep_alive_expect_and_upgrade_as_h11_decides(version, headers, keep_alive, expect, switch) -> None:
    decided, _ = framing.request_framing(b"GET", b"/", version, headers)
    assert (decided.keep_alive, decided.expect_continue, decided.switch_proposed) == (keep_alive, expect, switch)
    conn = h11.Connection(h11.SERVER)
    lines = b"".join(b"%s: %s\r\n" % h for h in headers)
    conn.receive_data(b"GET / HTTP/%s\r\n%s\r\n" % (version, lines))
    assert isinstance(conn.next_event(), h11.Request)
    assert conn._cstate.keep_alive == keep_alive
    assert conn.they_are_waiting_for_100_continue == expect


@given(
    value=st.one_of(
        st.lists(st.sampled_from([b"0", b"7", b"12", b"9" * 21, b",", b", ", b" ", b"x", b"\xd9\xa3"]), max_size=5).map(
            b"".join
        ),
        st.integers(0, 10**25).map(lambda n: str(n).encode()),
    )
)
def test_a_content_length_is_read_as_h11_reads_it(value: bytes) -> None:
    """The same number, or the same refusal: the plain-digits shortcut and the full reading alike."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n" % value)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        with pytest.raises(framing.FramingError) as refused:
            framing.content_length(value.strip())
        assert str(refused.value) == str(exc)
        return
    assert isinstance(event, h11.Request)
    assert framing.content_length(value.strip()) == dict(event.headers)[b"content-length"]


REQUEST_FIELDS = [
    (b"host", b"a"),
    (b"content-length", b"3"),
    (b"content-length", b"3, 3"),
    (b"content-length", b"9" * 21),
    (b"content-length", b"x"),
    (b"transfer-encoding", b"chunked"),
    (b"transfer-encoding", b"Chunked"),
    (b"transfer-encoding", b"gzip"),
    (b"connection", b"close"),
    (b"connection", b"keep-alive, Close"),
    (b"expect", b"100-continue"),
    (b"expect", b"nothing"),
    (b"upgrade", b"websocket"),
    (b"upgrade", b","),
    (b"x-a", b"1"),
]


@settings(max_examples=400, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"POST", b"CONNECT"]),
    version=st.sampled_from([b"1.1", b"1.0"]),
    headers=st.lists(st.sampled_from(REQUEST_FIELDS), max_size=5),
)
def test_a_request_head_is_framed_as_h11_frames_it(method: bytes, version: bytes, headers: list) -> None:
    """The look-up path (no repeated name) and the pass over every header alike: h11's refusal
    (its words), or its headers, keep-alive, 100-continue, framing and switch."""
    conn = h11.Connection(h11.SERVER)
    lines = b"".join(b"%s: %s\r\n" % h for h in headers)
    target = b"a:1" if method == b"CONNECT" else b"/"
    conn.receive_data(b"%s %s HTTP/%s\r\n%s\r\n" % (method, target, version, lines))
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        with pytest.raises(framing.FramingError) as refused:
            framing.request_framing(method, target, version, headers)
        assert str(refused.value) == str(exc)
        return
    assert isinstance(event, h11.Request)
    decided, normalized = framing.request_framing(method, target, version, headers)
    assert normalized == list(event.headers)
    assert decided.keep_alive == conn._cstate.keep_alive
    assert decided.expect_continue == conn.they_are_waiting_for_100_continue
    assert decided.chunked == (type(conn._reader).__name__ == "ChunkedReader")
    if not decided.chunked:
        assert decided.length == (getattr(conn._reader, "_length", 0) if conn._reader is not None else 0)
    assert decided.switch_proposed == (
        method == b"CONNECT" or any(n == b"upgrade" for n, _ in event.headers if _.strip(b", "))
    )
