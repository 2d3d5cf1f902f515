"""HTTP/1.1 on an upstream connection, without I/O: h11's rules written out for the fast path.

The upstream face has two implementations behind one interface (:class:`UpstreamHTTP`, the
``http`` attribute of :class:`~proxy.upstream.connection.UpstreamConnection`), chosen by
``[server] http`` as the client face's head parser is: h11 (:mod:`proxy.upstream.h11_impl`, the
reference) and a fast one (:mod:`proxy.upstream.httptools_impl`). This module holds what the fast
one decides, each piece the way h11 decides it, so that both give the same answer case for case:

* :func:`request_head`: the request head as h11 writes it (Host first, names as given, values
  after ``": "``), refusing what h11 refuses (a name that is not a token; a value with NUL, CR,
  LF or surrounding blanks; conflicting lengths; a transfer coding other than chunked; no Host
  or two), with the ``Content-Length`` / ``Transfer-Encoding`` values normalised as h11 does
  (:func:`plain_request_head` writes the common proxied request in one pass over all fields);
* :class:`RequestBody`: the body's framing (a length h11 holds the body to, or chunks);
* :func:`plain_head`: whether a response head is in the part of h11's grammar the fast parser
  takes (CRLF lines, no folded line, every line as h11's own expressions accept it); any other
  head goes to h11 whole, which decides;
* :class:`BodyReader`: the response body de-framed by length, empty, or up to the close (a
  chunked body is :class:`~proxy.http.chunked.ChunkScanner`'s);
* :func:`keep_alive`: h11's keep-alive rule for one side of the exchange.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from ..http.chunked import ChunkScanner, Framing
from ..http.framing import CONTENT_LENGTH_MAX_DIGITS, FramingError, comma_tokens, content_length

Headers = list[tuple[bytes, bytes]]

# h11's grammar (h11/_abnf.py), byte for byte: a token, a field value, a status line. The
# repetitions are possessive (``++``, ``*+``): each run of non-blanks or blanks is maximal in any
# match (what follows a run never starts with what the run takes), so the matches are h11's, and
# the engine keeps no backtracking state for them (a response head's match 3.2 -> 2.5 us).
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]++"
_VCHAR_OR_OBS = rb"[^\x00\s]"
_FIELD_VALUE = rb"(?:" + _VCHAR_OR_OBS + rb"++(?:[ \t]++" + _VCHAR_OR_OBS + rb"++)*+)?+"
_HEADER_LINE = _TOKEN + rb":[ \t]*+" + _FIELD_VALUE + rb"[ \t]*+\r\n"
_STATUS_LINE = rb"HTTP/[0-9]\.[0-9] [0-9]{3}(?: (?:[ \t]|" + _VCHAR_OR_OBS + rb")*+)?\r\n"

TOKEN = re.compile(_TOKEN)
FIELD_VALUE = re.compile(_FIELD_VALUE)
# Every name, every value at once, joined by LF (which neither may hold: the count of LFs says so).
TOKENS = re.compile(_TOKEN + rb"(?:\n" + _TOKEN + rb")*")
FIELD_VALUES = re.compile(_FIELD_VALUE + rb"(?:\n" + _FIELD_VALUE + rb")*")
TARGET = re.compile(rb"[\x21-\x7e]+")
# Every header as ``name NUL value``, joined by LF (neither may hold a NUL or an LF): one pass for all.
FIELDS = re.compile(_TOKEN + rb"\x00" + _FIELD_VALUE + rb"(?:\n" + _TOKEN + rb"\x00" + _FIELD_VALUE + rb")*")
# The methods a proxied request has (all tokens), encoded: no encode and no token check for them.
_METHODS = {m: m.encode() for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}
PLAIN_HEAD = re.compile(_STATUS_LINE + rb"(?:" + _HEADER_LINE + rb")*+\r\n")


class RequestRefused(Exception):
    """A request head or body that cannot be sent as HTTP/1.1 (h11's ``LocalProtocolError``)."""


class BrokenResponse(Exception):
    """The upstream broke HTTP/1.1 (h11's ``RemoteProtocolError``); the message is h11's."""


class ResponseHead(NamedTuple):  # a tuple: one per exchange, a third of a frozen dataclass's cost
    """One response head as h11 reads it: names lower-cased, values without surrounding blanks,
    one ``content-length`` at most, ``transfer-encoding`` lower-cased. ``framing`` is None for a 1xx."""

    status: int
    version: bytes  # b"1.1"
    headers: Headers
    framing: Framing | None


class UpstreamHTTP(Protocol):
    """HTTP/1.1 on one upstream connection, one exchange at a time (both implementations).

    Requests: :meth:`request` once, :meth:`data` per body piece, :meth:`end` once; each returns
    the bytes to write and raises :class:`RequestRefused`. Responses: :meth:`read_head` per head
    (1xx ones too), then the body with :meth:`deframe` (not chunked), :meth:`end_bodiless` or
    :meth:`end_chunked`; they raise :class:`BrokenResponse`. :meth:`reusable` says whether the
    connection may carry another request; :meth:`start_next_cycle` readies it for that.
    """

    def request(self, method: str, target: bytes, headers: Headers) -> bytes: ...

    def data(self, data: bytes) -> bytes: ...

    def end(self) -> bytes: ...

    def read_head(self, head: bytes) -> ResponseHead: ...

    def deframe(self, data: bytes, out: list[bytes]) -> int | None:
        """Append the body data in ``data`` (``b""``: the upstream closed) to ``out``; once the
        body has ended, how many bytes came after it (None while it goes on)."""
        ...

    def end_bodiless(self, initial: bytes) -> int:
        """The body of a bodiless answer (nothing may follow the head): the bytes after it."""
        ...

    def end_chunked(self, terminator: bytes) -> bool:
        """A chunked body ended with ``terminator`` (last chunk, trailers, blank line, as
        :attr:`~proxy.http.chunked.ChunkScanner.canonical_terminator` gives it); False when the
        implementation disagrees with the scanner (the connection is then never reused)."""
        ...

    def reusable(self) -> bool: ...

    def start_next_cycle(self) -> None: ...


# --- requests ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestFraming:
    """What the head of a request says about its body and its connection."""

    chunked: bool
    length: int  # for a body that is not chunked: 0 when the head names no length (h11's rule)
    keep_alive: bool


def request_head(method: str, target: bytes, headers: Headers) -> tuple[bytes, RequestFraming]:
    """The head h11 writes for this request, and its framing; :class:`RequestRefused` for what
    h11 refuses (its messages)."""
    plain = plain_request_head(method, target, headers)
    return plain if plain is not None else _request_head(method, target, headers)


# The framing of a plain head per declared length (immutable, so shared): a dict look-up where a
# frozen dataclass costs a call and three setattrs. Bounded: lengths past the bound are made each time.
_PLAIN_FRAMING: dict[int, RequestFraming] = {}


def plain_request_head(method: str, target: bytes, headers: Headers) -> tuple[bytes, RequestFraming] | None:
    """:func:`request_head` of the common request in a few passes over the whole head rather
    than several calls per header, or None when it is not that request: a known method, Host
    first and once, every name and value valid, at most one plain ``Content-Length`` (digits),
    no ``Transfer-Encoding`` or ``Connection``. h11 writes such a head as given, so the head is
    the fields themselves."""
    encoded = _METHODS.get(method)
    if encoded is None or not headers:
        return None
    fields = b"\n".join(map(b"\x00".join, headers))
    if FIELDS.fullmatch(fields) is None or fields.count(b"\n") != len(headers) - 1:
        return None
    # Each name now ends with the only NUL of its line: "name\x00" finds a name, never a value.
    lower = fields.lower()
    if not lower.startswith(b"host\x00") or b"\nhost\x00" in lower:
        return None
    if b"transfer-encoding\x00" in lower or b"connection\x00" in lower:
        return None
    length = 0
    at = lower.find(b"content-length\x00")
    if at >= 0:
        if (at and lower[at - 1] != 10) or lower.find(b"content-length\x00", at + 15) >= 0:
            return None  # a longer name ending so, or two lengths: the general path decides
        end = lower.find(b"\n", at)
        value = fields[at + 15 : end if end >= 0 else len(fields)]
        if not value.isdigit() or len(value) > CONTENT_LENGTH_MAX_DIGITS:
            return None
        length = int(value)
    if TARGET.fullmatch(target) is None:
        return None
    framing = _PLAIN_FRAMING.get(length)
    if framing is None:
        framing = RequestFraming(False, length, True)
        if len(_PLAIN_FRAMING) < 4096:
            _PLAIN_FRAMING[length] = framing
    head = b"%s %s HTTP/1.1\r\n%s\r\n\r\n" % (encoded, target, fields.replace(b"\x00", b": ").replace(b"\n", b"\r\n"))
    return head, framing


def _request_head(method: str, target: bytes, headers: Headers) -> tuple[bytes, RequestFraming]:
    """:func:`request_head` header by header, in h11's order of refusals."""
    # When a name or value is bad, each is checked in h11's order (name, value, then that
    # header's framing rules) so that the refusal is the one h11 gives.
    each = not _valid_fields(headers)
    lines: list[bytes] = []
    host: list[bytes] = []
    hosts = 0
    length: bytes | None = None
    chunked = False
    close = False
    for name, value in headers:
        if each:
            if TOKEN.fullmatch(name) is None:
                raise RequestRefused(f"Illegal header name {name!r}")
            if FIELD_VALUE.fullmatch(value) is None:
                raise RequestRefused(f"Illegal header value {value!r}")
        lower = name.lower()
        if lower == b"host":
            hosts += 1
            host.append(b"%s: %s\r\n" % (name, value))
            continue
        if lower == b"content-length":
            try:
                value = content_length(value)
            except FramingError as exc:
                raise RequestRefused(str(exc)) from None
            if length is not None:
                if length != value:
                    raise RequestRefused("conflicting Content-Length headers")
                continue
            length = value
        elif lower == b"transfer-encoding":
            if chunked:
                raise RequestRefused("multiple Transfer-Encoding headers")
            value = value.lower()
            if value != b"chunked":
                raise RequestRefused("Only Transfer-Encoding: chunked is supported")
            chunked = True
        elif lower == b"connection" and b"close" in comma_tokens(value):
            close = True
        lines.append(b"%s: %s\r\n" % (name, value))
    if hosts == 0:
        raise RequestRefused("Missing mandatory Host: header")
    if hosts > 1:
        raise RequestRefused("Found multiple Host: headers")
    encoded = method.encode("ascii", "replace")
    if TOKEN.fullmatch(encoded) is None:
        raise RequestRefused("Illegal method characters")
    if TARGET.fullmatch(target) is None:
        raise RequestRefused("Illegal target characters")
    head = b"".join([b"%s %s HTTP/1.1\r\n" % (encoded, target), *host, *lines, b"\r\n"])
    framing = RequestFraming(chunked, 0 if chunked or length is None else int(length), not close)
    return head, framing


def _valid_fields(headers: Headers) -> bool:
    """Whether every name is a token and every value a field value (two regex passes, not two per header)."""
    names = b"\n".join([n for n, _ in headers])
    values = b"\n".join([v for _, v in headers])
    lines = len(headers) - 1
    return (
        not headers
        or TOKENS.fullmatch(names) is not None
        and FIELD_VALUES.fullmatch(values) is not None
        and names.count(b"\n") == lines
        and values.count(b"\n") == lines
    )


class RequestBody:
    """The request body's framing on the wire: chunks, or the length the head declared."""

    __slots__ = ("chunked", "left")

    def __init__(self, framing: RequestFraming):
        self.chunked = framing.chunked
        self.left = framing.length

    def data(self, data: bytes) -> bytes:
        if self.chunked:
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        self.left -= len(data)
        if self.left < 0:
            raise RequestRefused("Too much data for declared Content-Length")
        return data

    def end(self) -> bytes:
        if self.chunked:
            return b"0\r\n\r\n"
        if self.left != 0:
            raise RequestRefused("Too little data for declared Content-Length")
        return b""


# --- responses -----------------------------------------------------------------------------------


def plain_head(head: bytes) -> bool:
    """Whether a response head (through its blank line) is in the part of h11's grammar the fast
    parser reads: CRLF line ends, no folded line, the status line and every header line as
    h11's expressions accept them. A head h11 would read differently (or refuse) is not plain."""
    return PLAIN_HEAD.fullmatch(head) is not None


def normalized(headers: Headers) -> tuple[Headers, bytes | None, bool, bool] | None:
    """``headers`` (names lower-cased, values stripped) as h11 keeps them, or None where h11's
    rule is not the plain one (a length that is a list, repeated or malformed; a transfer
    coding other than ``chunked``, or two): the head then goes to h11, which decides. With the
    headers, what the pass saw: the Content-Length (None: none), whether the Transfer-Encoding
    is there (then ``chunked``), whether a Connection header is (:func:`keep_alive` reads it)."""
    length: bytes | None = None
    coding = connection = False
    for i, (name, value) in enumerate(headers):
        if name == b"content-length":
            if length is not None or not value.isdigit() or len(value) > CONTENT_LENGTH_MAX_DIGITS:
                return None
            length = value
        elif name == b"transfer-encoding":
            if coding:
                return None
            lower = value.lower()
            if lower != b"chunked":
                return None
            headers[i] = (name, lower)
            coding = True
        elif name == b"connection":
            connection = True
    return headers, length, coding, connection


def keep_alive(version: bytes, headers: Headers) -> bool:
    """h11's rule: no ``close`` among the ``Connection`` tokens, and HTTP/1.1 or later."""
    for name, value in headers:
        if name == b"connection" and b"close" in comma_tokens(value):
            return False
    return version >= b"1.1"


class BodyReader:
    """A response body delimited by its length or by the close (h11's ``ContentLengthReader`` and
    ``Http10Reader``): de-frames reads, says where the body ended."""

    __slots__ = ("done", "left", "length", "to_close")

    def __init__(self, framing: Framing):
        self.to_close = framing.kind == "close"
        self.length = framing.length if framing.kind == "length" else 0
        self.left = self.length
        self.done = False

    def feed(self, data: bytes, out: list[bytes]) -> int | None:
        """Append the body data in ``data`` to ``out``; once the body has ended, how many
        bytes came after it (None while it goes on). ``b""`` is the upstream's close."""
        if self.to_close:
            if data:
                out.append(data)
                return None
            self.done = True
            return 0
        left = self.left
        if not data:
            if left:
                raise BrokenResponse(
                    "peer closed connection without sending complete message body "
                    f"(received {self.length - left} bytes, expected {self.length})"
                )
            self.done = True
            return 0
        if len(data) < left:
            out.append(data)
            self.left = left - len(data)
            return None
        if left:
            out.append(data if len(data) == left else data[:left])
        self.left = 0
        self.done = True
        return len(data) - left


def deframe_chunked(scanner: ChunkScanner, data: bytes, out: list[bytes], end: Callable[[bytes], bool]) -> int | None:
    """:meth:`UpstreamHTTP.deframe` of a chunked body, for both implementations (the relay's
    scanner: the same answer whether or not the body is passed through)."""
    if not data:
        raise BrokenResponse("peer closed connection without sending complete message body: incomplete chunked read")
    used = scanner.feed(data, out)
    if not scanner.done:
        return None
    return len(data) - used if end(scanner.canonical_terminator) else 1


__all__ = [
    "BodyReader",
    "BrokenResponse",
    "Headers",
    "RequestBody",
    "RequestFraming",
    "RequestRefused",
    "ResponseHead",
    "UpstreamHTTP",
    "deframe_chunked",
    "keep_alive",
    "normalized",
    "plain_head",
    "request_head",
]
