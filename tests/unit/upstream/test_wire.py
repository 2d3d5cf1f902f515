"""The fast upstream face gives h11's answers, case for case (Hypothesis; h11 is the oracle).

One exchange is played on both implementations of :class:`~proxy.upstream.wire.UpstreamHTTP`:
a request (headers with bytes h11 refuses now and then, a body that fits its framing or not),
then response heads (1xx before the final one; bare LFs, folded lines, control bytes, odd
versions and statuses, repeated or malformed lengths, transfer codings) and the body split at
random reads, ending at the close or not. Every step's result (the bytes written, the head
read, the body de-framed and what came after it, the keep-alive decision, or the refusal and
its message) must be the same on both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import h11
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from proxy.errors import UpstreamProtocolError
from proxy.http.chunked import Framing
from proxy.upstream.h11_impl import H11HTTP
from proxy.upstream.wire import (
    BodyReader,
    BrokenResponse,
    RequestRefused,
    ResponseHead,
    keep_alive,
    plain_head,
    plain_request_head,
)

pytest.importorskip("httptools")
from proxy.upstream.httptools_impl import HttptoolsHTTP  # noqa: E402

WIRE = settings(
    max_examples=800, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
HEAD_END = re.compile(rb"\n\r?\n")  # where a response head is cut (proxy.http.parsers.head_end)


def rarely(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n + 1`` (Hypothesis drives small integers to 0 far more often)."""
    return st.sampled_from([False] * n + [True])


CLEAN_NAME = st.sampled_from([b"x-a", b"Content-Type", b"server", b"link", b"x-b", b"Set-Cookie"])
CLEAN_VALUE = st.sampled_from([b"v", b"a b", b"a\tb", b"", b"a, b", b'"q;w=e"', b"\xe9t\xe9", b"a\x01b"])
NAME = st.one_of(
    st.binary(min_size=0, max_size=6).map(lambda b: b"x-" + b),  # any byte: mostly not a token
    st.sampled_from([b"x y", b"x:y", b"", b"\xe9", b"x\t"]),
)
VALUE = st.one_of(
    st.sampled_from([b" v", b"v ", b"\tv\t"]),
    st.binary(max_size=8),
    st.text("ab \t\x01\x0b\x0c\x7f\x80é:,;", max_size=6).map(lambda t: t.encode("utf-8")),
)
LENGTH = st.sampled_from([b"0", b"3", b"5", b"12", b"005", b"5, 5", b"5,6", b"abc", b"", b" 5", b"-1", b"1" * 21])
CODING = st.sampled_from([b"chunked", b"Chunked", b"CHUNKED ", b"gzip, chunked", b"identity", b"chunked, chunked"])
CONNECTION = st.sampled_from([b"close", b"keep-alive", b"Close", b"foo, close", b"closed", b"upgrade"])


@st.composite
def header(draw: st.DrawFn) -> tuple[bytes, bytes]:
    kind = draw(st.sampled_from(["clean"] * 20 + ["any", "length", "coding", "connection"]))
    if kind == "clean":
        return draw(CLEAN_NAME), draw(CLEAN_VALUE)
    if kind == "length":
        return draw(st.sampled_from([b"content-length", b"Content-Length"])), draw(LENGTH)
    if kind == "coding":
        return b"transfer-encoding", draw(CODING)
    if kind == "connection":
        return b"connection", draw(CONNECTION)
    return draw(NAME), draw(VALUE)


@st.composite
def status_line(draw: st.DrawFn, informational: bool) -> bytes:
    version = draw(st.sampled_from([b"1.1"] * 16 + [b"1.0", b"1.0", b"2.0", b"0.9", b"1.x", b"11"]))
    if informational:
        status = draw(st.sampled_from([b"100", b"102", b"103", b"101", b"199"]))
    else:
        common = [b"200"] * 8 + [b"204", b"304", b"404", b"500", b"099", b"999", b"20", b"2000"]
        status = draw(st.sampled_from(common)) if not draw(rarely(3)) else b"%03d" % draw(st.integers(0, 999))
    reason = draw(
        st.sampled_from([b" OK", b" Whatever it is", b"", b" ", b" \x01", b" \xe9t\xe9", b" a\x0bb", b"  OK"])
    )
    sep = draw(st.sampled_from([b" "] * 20 + [b"  ", b"\t"]))
    return b"HTTP/" + version + sep + status + reason


@st.composite
def response_head(draw: st.DrawFn, informational: bool = False) -> bytes:
    lines = [draw(status_line(informational))]
    for name, value in draw(st.lists(header(), max_size=5)):
        line = name + draw(st.sampled_from([b": "] * 8 + [b":", b":  ", b" : ", b":\t"])) + value
        if draw(rarely(19)):
            line = b" folded" if draw(st.booleans()) else line + b"\r\n\tfolded"  # obsolete line folding
        lines.append(line)
    ends = [draw(st.sampled_from([b"\r\n"] * 30 + [b"\n", b"\r\r\n"])) for _ in range(len(lines) + 1)]
    return b"".join(line + end for line, end in zip(lines, ends[:-1], strict=True)) + ends[-1]


@dataclass(frozen=True)
class Exchange:
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: list[bytes]
    heads: list[bytes]  # 1xx heads, then the final one
    rest: bytes  # what follows the last head
    cuts: list[int]  # where reads of ``rest`` split
    close: bool  # the upstream closes after ``rest``


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    method = draw(st.sampled_from(["GET", "GET", "POST", "HEAD", "PUT"]))
    target = draw(st.sampled_from([b"/v1/x?a=1"] * 40 + [b"/", b"/a b", b"/\x7f", b""]))
    headers = [] if draw(rarely(60)) else [(b"host", b"upstream.test")]
    headers += draw(st.lists(header(), max_size=4))
    if draw(rarely(60)):
        headers.append((b"Host", b"again"))
    body = draw(st.lists(st.binary(max_size=6), max_size=3)) if draw(st.booleans()) else []
    if not draw(rarely(3)):  # a body that fits: the exchange goes on to the response
        headers = [(n, v) for n, v in headers if n.lower() not in (b"content-length", b"transfer-encoding")]
        if body or draw(st.booleans()):
            headers.append((b"content-length", b"%d" % sum(map(len, body))))
    heads = [draw(response_head(informational=True)) for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2])))]
    heads.append(draw(response_head()))
    rest = draw(st.one_of(st.binary(max_size=20), st.sampled_from([b"3\r\nabc\r\n0\r\n\r\n", b"0\r\nx-t: 1\r\n\r\n"])))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(rest)), max_size=3))))
    return Exchange(method, target, headers, body, heads, rest, cuts, draw(st.booleans()))


def play(http: H11HTTP | HttptoolsHTTP, ex: Exchange) -> list[object]:
    """Every step's result, or the refusal that ended the exchange."""
    record: list[object] = []
    try:
        record.append(http.request(ex.method, ex.target, ex.headers))
        record += [http.data(piece) for piece in ex.body]
        record.append(http.end())
    except RequestRefused as exc:
        return [*record, ("refused", str(exc))]
    stream = b"".join(ex.heads) + ex.rest
    try:
        while True:
            match = HEAD_END.search(stream)
            if match is None:
                return [*record, "incomplete head"]
            head, stream = stream[: match.end()], stream[match.end() :]
            parsed = http.read_head(head)
            record.append(parsed)
            if parsed.framing is not None:
                break
        assert parsed.framing is not None
        stray: int | None = None
        if parsed.framing.bodiless:
            stray = http.end_bodiless(stream)
            record.append(("bodiless", stray))
        else:
            reads = [stream[a:b] for a, b in zip([0, *ex.cuts], [*ex.cuts, len(stream)], strict=True)]
            for data in [r for r in reads if r] + ([b""] if ex.close else []):
                out: list[bytes] = []
                excess = http.deframe(data, out)
                record.append((b"".join(out), excess))
                if excess is not None:
                    stray = excess
                    break
        # The connection goes back to the pool when all three say so (proxy.relay.stream).
        record.append(("reusable", http.reusable(), stray == 0 and parsed.framing.reusable))
    except BrokenResponse as exc:
        record.append(("broken", str(exc)))
    except UpstreamProtocolError as exc:  # the framing refused (a coding, conflicting lengths, broken chunks)
        record.append(("refused framing", type(exc).__name__, str(exc)))
    return record


def plain_get(*heads: bytes, rest: bytes = b"", close: bool = False) -> Exchange:
    return Exchange("GET", b"/", [(b"host", b"u")], [], list(heads), rest, [], close)


@WIRE
@given(exchanges())
@example(plain_get(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"))
@example(plain_get(b"HTTP/2.0 200 OK\r\ncontent-length: 2\r\n\r\n", rest=b"ok"))
@example(plain_get(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\n", rest=b"ok"))
@example(plain_get(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\n", rest=b"ok"))
@example(plain_get(b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\n", rest=b"okEXTRA"))
@example(plain_get(b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n", rest=b"2\r\nok\r\n0\r\nx-t: 1\r\n\r\n"))
@example(plain_get(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", rest=b"0\r\nx-t: a\x00\r\n\r\n"))
@example(plain_get(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n", rest=b"0\r\n\r\n"))
@example(plain_get(b"HTTP/1.1 200 OK\r\nx: a\r\n b\r\ncontent-length: 0\r\n\r\n"))
@example(plain_get(b"HTTP/1.1 200 OK\nx: a\ncontent-length: 0\n\n"))
@example(plain_get(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n"))
@example(plain_get(b"HTTP/1.1 200 OK\r\n\r\n", rest=b"until the close", close=True))
@example(
    Exchange(
        "POST",
        b"/",
        [(b"x-a", b"1"), (b"Host", b"u"), (b"content-length", b"2")],
        [b"o", b"k"],
        [b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"],
        b"",
        [],
        False,
    )
)  # Host goes first
@example(
    Exchange(
        "GET",
        b"/",
        [(b"host", b"u"), (b"transfer-encoding", b"gzip, chunked"), (b"x-", b" v")],
        [],
        [b"HTTP/1.1 200 OK\r\n\r\n"],
        b"",
        [],
        False,
    )  # fmt: skip
)  # h11 refuses the first problem it meets, header by header
def test_both_implementations_give_the_same_answer(ex: Exchange) -> None:
    reference = play(H11HTTP(), ex)
    fast = play(HttptoolsHTTP(), ex)
    event(str(reference[-1][0]) if isinstance(reference[-1], tuple) else str(reference[-1]))
    event("a plain final head" if any(isinstance(r, ResponseHead) and r.framing for r in reference)
          and plain_head(ex.heads[-1]) else "no plain final head")  # fmt: skip
    assert fast == reference


@settings(WIRE, max_examples=300)
@given(st.lists(exchanges(), min_size=2, max_size=3))
def test_a_reused_connection_gives_the_same_answers(exs: list[Exchange]) -> None:
    # One connection per implementation, the next exchange only when the last one left it reusable.
    reference, fast = H11HTTP(), HttptoolsHTTP()
    for ex in exs:
        ours, theirs = play(reference, ex), play(fast, ex)
        assert theirs == ours
        if ours[-1] != ("reusable", True, True):
            break
        reference.start_next_cycle()
        fast.start_next_cycle()


@st.composite
def near_plain_requests(draw: st.DrawFn) -> tuple[str, bytes, list[tuple[bytes, bytes]]]:
    """A proxied request as Parkway sends it (Host first, a length last), changed here and there
    where the fast request head must step aside: a second Host or length, a name that ends
    like a framing one, a NUL or LF inside a field, an unknown method."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "QUERY", "BAD METHOD"]))
    target = draw(st.sampled_from([b"/v1/chat/completions?small=1"] * 8 + [b"/", b"/a b", b""]))
    headers = [(draw(st.sampled_from([b"host", b"Host", b"HOST"])), b"127.0.0.1:9000")]
    odd = st.tuples(st.sampled_from(ODD_NAMES), st.one_of(CLEAN_VALUE, ODD_VALUES))
    headers += draw(st.lists(st.one_of(header(), odd), max_size=5))
    if draw(st.booleans()):
        headers.append((b"content-length", draw(st.sampled_from([b"61", b"0", b"007", b"1" * 20, b"1" * 21]))))
    if draw(rarely(8)):
        headers.insert(draw(st.integers(0, len(headers))), (draw(NAME), draw(VALUE)))
    return method, target, headers


ODD_NAMES = [b"x-content-length", b"x-host", b"host-x", b"x-connection", b"Content-LENGTH", b"CONNECTION",
             b"Transfer-Encoding", b"x-transfer-encoding", b"x\x00y", b"x\ny", b"host\nx", b"Host",
             b"x\x00y\nz"]  # fmt: skip
ODD_VALUES = st.sampled_from([b"5", b"61", b"a\nx\x00b", b"a\nhost\x00b", b"a\x00b"])


@WIRE
@given(near_plain_requests())
@example(("POST", b"/", [(b"host", b"u"), (b"x-content-length", b"a"), (b"content-length", b"2")]))
@example(("POST", b"/", [(b"host", b"u"), (b"content-length", b"2"), (b"Content-Length", b"2")]))
@example(("GET", b"/", [(b"host", b"u"), (b"x", b"a\x00b")]))
@example(("GET", b"/", [(b"host", b"u"), (b"x", b"a\nhost\x00b")]))
@example(("GET", b"/", [(b"host", b"u"), (b"x", b"a\ny\x00b")]))
@example(("GET", b"/", [(b"host", b"u"), (b"Host", b"v")]))
@example(("POST", b"/", [(b"host", b"u"), (b"Transfer-Encoding", b"chunked")]))
@example(("POST", b"/", [(b"host", b"u"), (b"Connection", b"close"), (b"content-length", b"3")]))
def test_the_plain_request_head_is_h11s(req: tuple[str, bytes, list[tuple[bytes, bytes]]]) -> None:
    """The fast request head (one pass over all the fields), where it answers, is h11's head
    and framing; elsewhere both implementations give h11's answer or refusal."""
    method, target, headers = req
    plain = plain_request_head(method, target, headers)
    event("plain" if plain is not None else "general")
    size = min(plain[1].length, 64) if plain is not None else 5  # the declared length, when it is small
    reference, fast = H11HTTP(), HttptoolsHTTP()
    expected, got = send(reference, req, size), send(fast, req, size)
    assert got == expected
    if plain is not None:
        assert [plain[0]] == expected[:1]
        if plain[1].length <= 64:  # the body filled the length: h11 is done, or must close
            assert (reference.conn.our_state is h11.DONE) is plain[1].keep_alive is fast.our_keep_alive is True


def send(http: H11HTTP | HttptoolsHTTP, req: tuple[str, bytes, list[tuple[bytes, bytes]]], size: int) -> list[object]:
    """A request head and a body of ``size`` bytes: every step's bytes, or the refusal that ended it."""
    record: list[object] = []
    try:
        record.append(http.request(*req))
        record.append(http.data(b"x" * size))
        record.append(http.end())
    except RequestRefused as exc:
        record.append(("refused", str(exc)))
    return record


def test_parkways_own_request_takes_the_plain_head() -> None:
    headers = [(b"host", b"127.0.0.1:9000"), (b"content-type", b"application/json"), (b"content-length", b"61")]
    plain = plain_request_head("POST", b"/v1/chat/completions", headers)
    assert plain is not None and plain[1].length == 61
    assert plain[0] == (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:9000\r\ncontent-type: application/json\r\n"
        b"content-length: 61\r\n\r\n"
    )


# --- the pure pieces, by table ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "plain"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", True),
        (b"HTTP/1.1 200\r\n\r\n", True),  # no reason phrase: h11 takes it
        (b"HTTP/1.1 200 OK\nx: y\r\n\r\n", False),  # a bare LF: h11 decides
        (b"HTTP/1.1 200 OK\r\nx: y\r\n folded\r\n\r\n", False),  # obsolete folding: h11 decides
        (b"HTTP/1.1 200 OK\r\nx : y\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nx: a\x00b\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nx: a\x01b\r\n\r\n", True),  # h11's field-vchar is "not NUL, not a blank"
    ],
)
def test_plain_head(head: bytes, plain: bool) -> None:
    assert plain_head(head) is plain


@pytest.mark.parametrize(
    ("version", "headers", "alive"),
    [
        (b"1.1", [], True),
        (b"1.0", [], False),
        (b"2.0", [], True),  # h11 compares versions
        (b"1.1", [(b"connection", b"Keep-Alive, Close")], False),
        (b"1.1", [(b"connection", b"closed")], True),
    ],
)
def test_keep_alive(version: bytes, headers: list[tuple[bytes, bytes]], alive: bool) -> None:
    assert keep_alive(version, headers) is alive


def test_a_length_body_says_what_came_after_it() -> None:
    reader = BodyReader(Framing("length", 5))
    out: list[bytes] = []
    assert reader.feed(b"hel", out) is None
    assert reader.feed(b"loEXTRA", out) == 5
    assert out == [b"hel", b"lo"] and reader.done


def test_a_length_body_cut_short_is_broken() -> None:
    reader = BodyReader(Framing("length", 5))
    assert reader.feed(b"hel", []) is None
    with pytest.raises(BrokenResponse, match="received 3 bytes, expected 5"):
        reader.feed(b"", [])
