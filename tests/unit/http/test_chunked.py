"""The pure chunk scanner and the response framing rules (RFC 9112 §6.1, §6.3, §7.1)."""

from __future__ import annotations

import random

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import UpstreamProtocolError
from proxy.http.chunked import ChunkScanner, Framing, MalformedChunks, body_framing, plain_body_framing

# (wire bytes of a whole chunked body, de-framed data, terminator)
WELL_FORMED = [
    (b"0\r\n\r\n", b"", b"0\r\n\r\n"),
    (b"5\r\nhello\r\n0\r\n\r\n", b"hello", b"0\r\n\r\n"),
    (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world", b"0\r\n\r\n"),
    (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789", b"0\r\n\r\n"),
    (b"a\r\n0123456789\r\n000\r\n\r\n", b"0123456789", b"000\r\n\r\n"),
    (b"3;name=value\r\nabc\r\n0;last\r\n\r\n", b"abc", b"0;last\r\n\r\n"),
    (b"3  \r\nabc\r\n0\r\n\r\n", b"abc", b"0\r\n\r\n"),  # h11 accepts trailing whitespace
    (b"2\r\n\r\n\r\n0\r\nx-usage: 12\r\nx-other: a b\r\n\r\n", b"\r\n", b"0\r\nx-usage: 12\r\nx-other: a b\r\n\r\n"),
    (b"8e\r\n" + b"d" * 0x8E + b"\r\n0\r\n\r\n", b"d" * 0x8E, b"0\r\n\r\n"),
]

MALFORMED = [
    b"x\r\nabc\r\n0\r\n\r\n",  # not hex
    b"0x3\r\nabc\r\n0\r\n\r\n",  # int() would take it
    b"+3\r\nabc\r\n0\r\n\r\n",
    b"-1\r\n",
    b" 3\r\nabc\r\n0\r\n\r\n",
    b"1_0\r\n",
    b"3\nabc\r\n0\r\n\r\n",  # bare LF ends the size line
    b"\r\n",  # empty size line
    b"3\r\nabcd\r\n0\r\n\r\n",  # data longer than its size
    b"3\r\nabc\n0\r\n\r\n",  # data end without CR
    b"3\r\nabcXY",
    b"11111111111111111\r\n",  # 17 hex digits
    b"0\r\nnot a header\r\n\r\n",
    b"0\r\n: empty name\r\n\r\n",
    b"0\r\nname: x\n\r\n",
    b"3\r\nabc\r\n" + b"9" * 5000,  # over-long size line, never ended
]


def scan(wire: bytes, cuts: list[int]) -> tuple[bytes, int, ChunkScanner]:
    """Feed ``wire`` cut at ``cuts``; return the de-framed data, the body's end and the scanner."""
    scanner, out, offset, end = ChunkScanner(), [], 0, None
    for a, b in zip([0, *cuts], [*cuts, len(wire)]):
        used = scanner.feed(wire[a:b], out)
        if scanner.done and end is None:
            end = a + used
        offset = b
    assert offset == len(wire)
    return b"".join(out), end if end is not None else -1, scanner


@pytest.mark.parametrize(("wire", "data", "terminator"), WELL_FORMED)
def test_every_split_of_a_well_formed_body_gives_the_same_data_and_end(wire, data, terminator) -> None:
    for cut in range(len(wire) + 1):
        got, end, scanner = scan(wire, [cut])
        assert (got, end, scanner.terminator) == (data, len(wire), terminator), cut
    got, end, scanner = scan(wire, list(range(1, len(wire))))  # byte by byte
    assert (got, end, scanner.terminator) == (data, len(wire), terminator)


@pytest.mark.parametrize(("wire", "data", "terminator"), WELL_FORMED)
def test_the_scanner_agrees_with_h11(wire, data, terminator) -> None:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + wire)
    events = []
    while type(event := conn.next_event()) is not h11.EndOfMessage:
        events.append(event)
    assert b"".join(bytes(e.data) for e in events[1:]) == data


@pytest.mark.parametrize("wire", [w for w, _, _ in WELL_FORMED])
def test_bytes_after_the_terminator_are_not_part_of_the_body(wire) -> None:
    extra = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nPOISONED"
    scanner = ChunkScanner()
    assert scanner.feed(wire + extra) == len(wire)
    assert scanner.done
    assert scanner.feed(b"more") == 0  # a finished body takes nothing more


@pytest.mark.parametrize("wire", MALFORMED)
def test_malformed_framing_is_refused_however_it_is_split(wire) -> None:
    for cut in range(len(wire) + 1):
        scanner = ChunkScanner()
        with pytest.raises(MalformedChunks):
            scanner.feed(wire[:cut])
            scanner.feed(wire[cut:])
            assert scanner.done, "a malformed body must never end cleanly"
            raise AssertionError("unreachable")


def test_malformed_chunks_is_an_upstream_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError) as caught:
        ChunkScanner().feed(b"zz\r\n")
    assert caught.value.status == 502 and "chunk-size" in caught.value.message


def test_random_bodies_random_splits() -> None:
    rng = random.Random(11)
    for _ in range(200):
        pieces = [rng.randbytes(rng.randrange(1, 300)) for _ in range(rng.randrange(0, 6))]
        wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        cuts = sorted(rng.sample(range(1, len(wire)), min(len(wire) - 1, rng.randrange(0, 8))))
        got, end, _ = scan(wire, cuts)
        assert (got, end) == (b"".join(pieces), len(wire))


def test_out_none_tracks_boundaries_without_collecting() -> None:
    scanner = ChunkScanner()
    assert scanner.feed(b"5\r\nhello\r\n0\r\n\r\n", None) == 15 and scanner.done


@pytest.mark.parametrize(
    ("method", "status", "headers", "framing"),
    [
        ("GET", 200, [(b"content-length", b"12")], Framing("length", 12)),
        ("GET", 200, [(b"content-length", b"12, 12")], Framing("length", 12)),
        ("GET", 200, [(b"transfer-encoding", b"chunked")], Framing("chunked")),
        ("GET", 200, [(b"transfer-encoding", b"Chunked")], Framing("chunked")),
        # RFC 9112 6.1: Transfer-Encoding wins, the length is dropped, the connection is not kept.
        ("GET", 200, [(b"content-length", b"3"), (b"transfer-encoding", b"chunked")],
         Framing("chunked", dropped_length=True)),
        ("GET", 200, [], Framing("close")),
        ("HEAD", 200, [(b"content-length", b"45")], Framing("empty")),
        ("GET", 204, [(b"content-length", b"45")], Framing("empty")),
        ("GET", 304, [(b"transfer-encoding", b"chunked")], Framing("empty")),
        ("GET", 101, [], Framing("empty")),
    ],
)  # fmt: skip
def test_body_framing(method, status, headers, framing) -> None:
    assert body_framing(method, status, headers) == framing


def test_framing_reusability() -> None:
    assert Framing("length", 3).reusable and Framing("chunked").reusable and Framing("empty").reusable
    assert not Framing("close").reusable
    assert not Framing("chunked", dropped_length=True).reusable


@pytest.mark.parametrize(
    "headers",
    [
        [(b"transfer-encoding", b"gzip, chunked")],
        [(b"transfer-encoding", b"chunked, chunked")],
        [(b"transfer-encoding", b"identity")],
        [(b"content-length", b"3"), (b"content-length", b"4")],
        [(b"content-length", b"-1")],
        [(b"content-length", b"0x10")],
        [(b"content-length", b"9" * 30)],
    ],
)
def test_framing_no_one_may_act_on_is_refused(headers) -> None:
    with pytest.raises(UpstreamProtocolError):
        body_framing("GET", 200, headers)


def test_a_zero_length_is_bodiless_like_a_body_that_cannot_exist():
    # The relay ends these at the head: nothing more is awaited from the upstream (issue 18, harm 1).
    assert Framing("empty").bodiless and Framing("length", 0).bodiless
    assert not Framing("length", 1).bodiless and not Framing("chunked").bodiless and not Framing("close").bodiless


# RFC 9112 §7.1.1: BWS before ";" (h11 refuses it, so these are not in the h11 agreement test).
WELL_FORMED_BWS = [
    (b"5 ;foo=bar\r\nhello\r\n0\r\n\r\n", b"hello", b"0\r\n\r\n"),
    (b"5\t; foo = bar\r\nhello\r\n0 ;last\r\n\r\n", b"hello", b"0 ;last\r\n\r\n"),
    (b'3 ; a="q;" \r\nabc\r\n0\r\nx-t: 1\r\n\r\n', b"abc", b"0\r\nx-t: 1\r\n\r\n"),
]


@pytest.mark.parametrize(("wire", "data", "terminator"), WELL_FORMED_BWS)
def test_bad_whitespace_before_a_chunk_extension_is_accepted(wire, data, terminator) -> None:
    for cut in range(len(wire) + 1):
        got, end, scanner = scan(wire, [cut])
        assert (got, end, scanner.terminator) == (data, len(wire), terminator), cut
        assert scanner.canonical_terminator == b"0\r\n" + terminator.partition(b"\r\n")[2]


@pytest.mark.parametrize(
    "wire",
    [b"5;a\rb\r\nhello\r\n0\r\n\r\n", b"5 \r;a\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0;x\ry\r\n\r\n"],
)
def test_a_bare_cr_in_a_size_line_is_refused(wire) -> None:
    # RFC 9112 §2.2: a bare CR is rejected, never passed on to a client that may read it as a line end.
    with pytest.raises(MalformedChunks):
        scan(wire, [])


def passed_on(wire: bytes, cuts: list[int]) -> bytes:
    """What pass-through writes for ``wire`` read in pieces cut at ``cuts`` (the terminator aside)."""
    scanner, written = ChunkScanner(), b""
    for a, b in zip([0, *cuts], [*cuts, len(wire)]):
        piece = wire[a:b]
        used = scanner.feed(piece)
        if scanner.rewritten is None:
            written += piece
        else:
            written, scanner.rewritten = written + scanner.rewritten, None
        assert used == len(piece) or scanner.done
    return written


@pytest.mark.parametrize(
    ("wire", "passed"),
    [
        (b"5\r\nhello\r\n3\r\nabc\r\n0\r\nx: 1\r\n\r\n", b"5\r\nhello\r\n3\r\nabc\r\n"),
        (b"5 ;foo=bar\r\nhello\r\n0 ;end\r\n\r\n", b"5\r\nhello\r\n"),
        (b"5;a=b\r\nhello\r\n6  \r\n world\r\n0\r\n\r\n", b"5\r\nhello\r\n6\r\n world\r\n"),
        (b"00A\r\n0123456789\r\n0\r\n\r\n", b"00A\r\n0123456789\r\n"),  # bare hex goes on as it came
    ],
)
def test_pass_through_drops_extensions_and_holds_the_terminator(wire, passed) -> None:
    # Every way of cutting the body into two reads passes the same bytes on (trailers: the relay's).
    for cut in range(len(wire) + 1):
        assert passed_on(wire, [cut] if 0 < cut < len(wire) else []) == passed, cut
    assert passed_on(wire, list(range(1, len(wire)))) == passed  # byte by byte


def test_a_read_of_whole_bare_chunks_passes_as_it_came() -> None:
    scanner = ChunkScanner()
    scanner.feed(b"2\r\nok\r\n")
    scanner.feed(b"2\r\nok\r\n3\r\nabc\r\n")
    assert scanner.rewritten is None


@given(
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    status=st.sampled_from([100, 200, 204, 304, 404]),
    length=st.one_of(st.none(), st.sampled_from([b"0", b"12", b"9" * 18, b"9" * 19])),
    chunked=st.booleans(),
    others=st.lists(st.sampled_from([(b"connection", b"close"), (b"x-a", b"1")]), max_size=2),
)
def test_the_plain_framing_is_body_framings(
    method: str, status: int, length: bytes | None, chunked: bool, others
) -> None:
    """What the upstream's header pass saw (one digits-only length, one chunked coding) gives
    :func:`body_framing`'s answer for those headers, or its refusal."""
    headers = [*others]
    if length is not None:
        headers.append((b"content-length", length))
    if chunked:
        headers.append((b"transfer-encoding", b"chunked"))
    try:
        expected: object = body_framing(method, status, headers)
    except UpstreamProtocolError as exc:
        expected = str(exc)
    try:
        got: object = plain_body_framing(method, status, length, chunked)
    except UpstreamProtocolError as exc:
        got = str(exc)
    assert got == expected
