"""HTTP/1.1 server-side framing decisions, without I/O: what a parsed request head means for its
body and its connection, and the exact bytes of a response head and body.

These are h11's decisions, written out so that a connection which parses with llhttp
(:mod:`proxy.http.httptools_impl`) answers byte for byte as h11 (:mod:`proxy.http.h11_impl`,
the reference) does: the request checks of ``h11._events.Request`` and
``h11._headers.normalize_and_validate``, keep-alive (RFC 9112 §9.3: ``Connection: close``, or
a client older than HTTP/1.1, ends the connection after the response), 100-continue, and the
response clean-up of ``h11.Connection._clean_up_response_headers_for_sending``: a body of
unknown length is chunked for an HTTP/1.1 client and delimited by the close for anything
older; a HEAD, 204 or 304 response carries no body whatever its headers say.
"""

from __future__ import annotations

import re
from typing import NamedTuple

Headers = list[tuple[bytes, bytes]]

CONTENT_LENGTH_MAX_DIGITS = 20  # as h11
_CONTENT_LENGTH = re.compile(rb"[0-9]+")

# How a response body is written (h11's writers).
LENGTH, CHUNKED, CLOSE = "length", "chunked", "close"


class FramingError(Exception):
    """A head that h11 would refuse (its message), for a 400 when it comes from the client."""


class RequestFraming(NamedTuple):  # a tuple: one per request, four times cheaper to build than a frozen dataclass
    """What a valid request head says about its body and its connection."""

    chunked: bool
    length: int  # the body length when not chunked (0: no body)
    keep_alive: bool  # RFC 9112 §9.3: the connection may carry another request
    expect_continue: bool  # the client waits for 100 Continue before sending its body
    switch_proposed: bool  # Upgrade or CONNECT: h11 holds the connection until the answer


def comma_tokens(value: bytes) -> list[bytes]:
    """The lower-cased, comma-split, non-empty items of one header value (h11's ``get_comma_header``)."""
    return [t for t in (v.strip() for v in value.lower().split(b",")) if t]


def _comma_split(values: list[bytes]) -> list[bytes]:
    """:func:`comma_tokens` of several values of one header."""
    return [t for value in values for t in comma_tokens(value)]


def content_length(value: bytes) -> bytes:
    """One Content-Length value as h11 reads it: a list of equal numbers is that number; a list
    of different ones, or anything but digits (at most h11's 20), is refused with h11's words."""
    if value.isdigit() and len(value) <= CONTENT_LENGTH_MAX_DIGITS:  # one plain number (ASCII digits)
        return value
    lengths = {v.strip() for v in value.split(b",")}
    if len(lengths) != 1:
        raise FramingError("conflicting Content-Length headers")
    text = lengths.pop()
    if not _CONTENT_LENGTH.fullmatch(text) or len(text) > CONTENT_LENGTH_MAX_DIGITS:
        raise FramingError("bad Content-Length")
    return text


def request_framing(method: bytes, target: bytes, version: bytes, headers: Headers) -> tuple[RequestFraming, Headers]:
    """Check a parsed request head as h11 does and say how its body is framed.

    The request line is h11's already (:func:`proxy.http.parsers.parse_request_head` reads
    only a line h11's pattern matches, or h11 read the head itself). ``headers`` have lower-case
    names and stripped values; returned as h11 would hand them on (one Content-Length, a
    lower-cased Transfer-Encoding). Raises :class:`FramingError`.
    """
    fields = dict(headers)  # one C call; as many entries as headers: no name is repeated
    if len(fields) == len(headers):
        decided = _plain_framing(method, version, fields)
        if decided is not None:
            return decided, headers
    return _framing_each(method, version, headers)


def _plain_framing(method: bytes, version: bytes, fields: dict[bytes, bytes]) -> RequestFraming | None:
    """:func:`request_framing` of a head without a repeated name, by look-ups rather than a pass
    over every header; None unless the head is valid and h11 keeps its headers as they are (a
    plain Content-Length, ``chunked`` as such, a Host where HTTP/1.1 needs one): the pass decides."""
    coding = fields.get(b"transfer-encoding")
    if coding is not None and coding != b"chunked":
        return None
    text = fields.get(b"content-length")
    if text is not None and not (text.isdigit() and len(text) <= CONTENT_LENGTH_MAX_DIGITS):
        return None
    if version == b"1.1" and b"host" not in fields:
        return None
    modern = version >= b"1.1"
    connection = fields.get(b"connection")
    expect = fields.get(b"expect")
    upgrade = fields.get(b"upgrade")
    return RequestFraming(
        coding is not None,
        0 if coding is not None or text is None else int(text),
        modern and not (connection is not None and b"close" in comma_tokens(connection)),  # keep_alive
        modern and expect is not None and b"100-continue" in comma_tokens(expect),  # expect_continue
        method == b"CONNECT" or (upgrade is not None and bool(comma_tokens(upgrade))),  # switch_proposed
    )


def _framing_each(method: bytes, version: bytes, headers: Headers) -> tuple[RequestFraming, Headers]:
    """:func:`request_framing` header by header, in h11's order of refusals."""
    length = 0
    chunked = False
    host_count = 0
    normalized: Headers | None = None
    seen_length: bytes | None = None
    connection: list[bytes] = []  # the values of the headers keep-alive, 100-continue and upgrades read
    expect: list[bytes] = []
    upgrade = False
    for i, (name, value) in enumerate(headers):
        if name == b"host":
            host_count += 1
        elif name == b"connection":
            connection.append(value)
        elif name == b"expect":
            expect.append(value)
        elif name == b"upgrade":
            upgrade = upgrade or bool(comma_tokens(value))
        elif name == b"content-length":
            text = content_length(value)
            if seen_length is not None and seen_length != text:
                raise FramingError("conflicting Content-Length headers")
            if seen_length is not None or text != value:
                normalized = normalized if normalized is not None else list(headers[:i])
                if seen_length is None:
                    normalized.append((name, text))
                seen_length = text
                continue
            seen_length = text
            length = int(text)
        elif name == b"transfer-encoding":
            if chunked:
                raise FramingError("multiple Transfer-Encoding headers")
            lowered = value.lower()
            if lowered != b"chunked":
                raise FramingError("Only Transfer-Encoding: chunked is supported")
            chunked = True
            if lowered != value:
                normalized = normalized if normalized is not None else list(headers[:i])
                normalized.append((name, lowered))
                continue
        if normalized is not None:
            normalized.append((name, value))
    if seen_length is not None:
        length = int(seen_length)
    if version == b"1.1" and host_count == 0:
        raise FramingError("Missing mandatory Host: header")
    if host_count > 1:
        raise FramingError("Found multiple Host: headers")
    if normalized is not None:
        headers = normalized
    modern = version >= b"1.1"
    framing = RequestFraming(
        chunked,
        0 if chunked else length,
        modern and not (connection and b"close" in _comma_split(connection)),  # keep_alive
        modern and bool(expect) and b"100-continue" in _comma_split(expect),  # expect_continue
        method == b"CONNECT" or upgrade,  # switch_proposed
    )
    return framing, headers


def _set_header(headers: list[tuple[bytes, bytes, bytes]], name: bytes, values: list[bytes]) -> None:
    """h11's ``set_comma_header``: drop every ``name`` header, append the new values title-cased."""
    headers[:] = [h for h in headers if h[1] != name]
    headers += [(name.title(), name, v) for v in values]


def _write_head(start: bytes, headers: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """The status line and the header lines, Host first as h11 writes them."""
    lines = [start, *[raw + b": " + value + b"\r\n" for raw, name, value in headers if name != b"host"], b"\r\n"]
    count = len(headers) + 2
    if len(lines) != count:  # a Host header (a response seldom has one)
        lines[1:1] = [raw + b": " + value + b"\r\n" for raw, name, value in headers if name == b"host"]
    head = b"".join(lines)
    # A CR or LF inside a name or value would split the response (h11 refuses such a header).
    if head.count(b"\n") != count or head.count(b"\r") != count:
        raise FramingError("a response header contains CR or LF")
    return head


def _normalized(headers: Headers) -> list[tuple[bytes, bytes, bytes]]:
    """(raw name, lower-case name, value), Content-Length and Transfer-Encoding as h11 normalizes them."""
    return _read_fields(headers)[0]


def _read_fields(headers: Headers) -> tuple[list[tuple[bytes, bytes, bytes]], bytes | None, bool, bool]:
    """:func:`_normalized`, and what the pass saw: the Content-Length, whether a Transfer-Encoding
    and a Connection header are there (so that the framing and keep-alive need no pass of their own)."""
    out: list[tuple[bytes, bytes, bytes]] = []
    seen_length: bytes | None = None
    seen_coding = seen_connection = False
    for raw, value in headers:
        name = raw.lower()
        if name == b"content-length":
            value = content_length(value)
            if seen_length is not None:
                if seen_length != value:
                    raise FramingError("conflicting Content-Length headers")
                continue
            seen_length = value
        elif name == b"transfer-encoding":
            if seen_coding:
                raise FramingError("multiple Transfer-Encoding headers")
            value = value.lower()
            if value != b"chunked":
                raise FramingError("Only Transfer-Encoding: chunked is supported")
            seen_coding = True
        elif name == b"connection":
            seen_connection = True
        out.append((raw, name, value))
    return out, seen_length, seen_coding, seen_connection


def _body_kind(method: bytes | None, status: int, length: bytes | None, chunked: bool) -> tuple[str, int]:
    """h11's ``_body_framing`` for a response: (kind, length), from the headers' one Content-Length
    (None: none) and whether ``Transfer-Encoding: chunked`` is there (it wins, wherever it is)."""
    if status in (204, 304) or method == b"HEAD" or (method == b"CONNECT" and 200 <= status < 300):
        return LENGTH, 0
    if chunked:
        return CHUNKED, 0
    if length is not None:
        return LENGTH, int(length)
    return CLOSE, 0


class ResponseStart(NamedTuple):  # a tuple, as RequestFraming
    """A response head as it goes on the wire, and how its body is written."""

    head: bytes
    body: str  # LENGTH, CHUNKED or CLOSE
    length: int  # for LENGTH: the exact number of body bytes
    keep_alive: bool  # the connection may carry another request after this response


def response_head(
    status: int,
    reason: bytes,
    headers: Headers,
    *,
    request_method: bytes | None,
    client_version: bytes | None,
    keep_alive: bool,
) -> ResponseStart:
    """The head of a final response (h11's clean-up, then its writer).

    ``request_method`` and ``client_version`` are None when no valid request was read (an
    error answer): the client is then taken for HTTP/1.0. ``keep_alive`` is what the request
    allowed."""
    items, length_text, chunked, connection = _read_fields(headers)
    need_close = False
    kind, length = _body_kind(b"GET" if request_method == b"HEAD" else request_method, status, length_text, chunked)
    if kind != LENGTH:  # a body of unknown length
        _set_header(items, b"content-length", [])
        length_text = None
        if client_version is None or client_version < b"1.1":
            _set_header(items, b"transfer-encoding", [])
            chunked = False
            if request_method != b"HEAD":
                need_close = True
        else:
            _set_header(items, b"transfer-encoding", [b"chunked"])
            chunked = True
    if not keep_alive or need_close:
        tokens: set[bytes] = set()
        if connection:
            for _, name, value in items:
                if name == b"connection":
                    tokens.update(comma_tokens(value))
        tokens.discard(b"keep-alive")
        tokens.add(b"close")
        _set_header(items, b"connection", sorted(tokens))
        connection = True
    if kind != LENGTH or request_method == b"HEAD":  # else the headers that decide it are as they were
        kind, length = _body_kind(request_method, status, length_text, chunked)
    if keep_alive and connection:
        for _, name, value in items:
            if name == b"connection" and b"close" in comma_tokens(value):
                keep_alive = False
    head = _write_head(b"HTTP/1.1 %d %s\r\n" % (status, reason), items)
    return ResponseStart(head, kind, length, keep_alive)


def informational_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """A 1xx head (100 Continue, 103 Early Hints), as h11 writes it."""
    return _write_head(b"HTTP/1.1 %d %s\r\n" % (status, reason), _normalized(headers))


def frame_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (nothing for no data: the empty chunk is the terminator)."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


LAST_CHUNK = b"0\r\n\r\n"
