"""HTTP/1.1 response body framing, without I/O: which framing a response has, and a chunk scanner.

When the upstream answers ``Transfer-Encoding: chunked`` and the client speaks HTTP/1.1, the
chunked framing going out is the framing coming in, so the relay passes the bytes through
unchanged. :class:`ChunkScanner` is what it still needs to know about them: where the body
ends (the terminator), whether the framing is well formed (anything else is refused, never
guessed at), and the de-framed data for observers. It follows RFC 9112 §7.1: chunk extensions
(with the bad whitespace §7.1.1 allows before ``;``) and trailing whitespace on the size line
are accepted and ignored; a bare CR anywhere in a size line is refused (§2.2), and so is a bare
LF as its end. For pass-through, :attr:`ChunkScanner.rewritten` says when a read must not go on
as it came: an extension is dropped, a split size line held until whole, and the terminator
held until complete so its trailers can be filtered (:meth:`ChunkScanner.trailer_lines`).

:func:`body_framing` is RFC 9112 §6.3 for a response: a body that cannot exist (HEAD, 1xx,
204, 304) is empty whatever the headers say; ``Transfer-Encoding: chunked`` beats
``Content-Length`` (§6.1: such an answer is framed by the chunks, its length is dropped and its
connection is not reused); otherwise ``Content-Length``; otherwise the body runs to the close.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..errors import UpstreamProtocolError

MAX_SIZE_LINE = 4096  # a chunk-size line with its extensions
MAX_TRAILERS = 16384  # the whole trailer section

# chunk-size [BWS ";" chunk-ext] CRLF; an extension is ignored, but never with a bare CR in it.
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r\n")
_TRAILER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*\r\n")

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)
_HEX = b"0123456789abcdefABCDEF"


class MalformedChunks(UpstreamProtocolError):
    """The upstream's chunked framing is broken: the stream is cut, the connection dropped."""


@dataclass(frozen=True, slots=True)
class Framing:
    """How a response body is delimited on the upstream connection."""

    kind: Literal["empty", "length", "chunked", "close"]
    length: int = 0  # for "length"
    dropped_length: bool = False  # chunked and Content-Length together: the length was ignored

    @property
    def bodiless(self) -> bool:
        """No body byte will follow the head: the answer is complete once its head is read
        (``Content-Length: 0`` too, so the relay never waits for a body that cannot come)."""
        return self.kind == "empty" or (self.kind == "length" and not self.length)

    @property
    def reusable(self) -> bool:
        """Whether the framing itself allows keeping the connection once the body is read."""
        return self.kind in ("empty", "length", "chunked") and not self.dropped_length


# The framings every response shares (a Framing is immutable): built once, not per response.
_EMPTY, _CLOSE = Framing("empty"), Framing("close")
_CHUNKED, _CHUNKED_DROPPED = Framing("chunked"), Framing("chunked", dropped_length=True)
_LENGTHS: dict[bytes, Framing] = {}  # by the Content-Length as sent; bounded below


def body_framing(method: str, status: int, headers: list[tuple[bytes, bytes]]) -> Framing:
    """The framing of a response to ``method`` with ``status`` and (lower-case) ``headers``.

    Raises :class:`~proxy.errors.UpstreamProtocolError` for framing no recipient may act on:
    a transfer coding other than chunked, or conflicting lengths.
    """
    if method == "HEAD" or status < 200 or status in (204, 304):
        return _EMPTY
    codings: list[bytes] = []
    lengths: set[bytes] = set()
    for name, value in headers:
        if name == b"transfer-encoding":
            codings += [c.strip().lower() for c in value.split(b",") if c.strip()]
        elif name == b"content-length":
            if value.isdigit():  # one plain number (the common case): no split
                lengths.add(value)
            else:
                lengths.update([v.strip() for v in value.split(b",")])
    if codings:
        if codings != [b"chunked"]:
            raise UpstreamProtocolError(f"upstream used an unsupported transfer coding: {b', '.join(codings)!r}")
        return _CHUNKED_DROPPED if lengths else _CHUNKED
    if lengths:
        if len(lengths) != 1:
            raise UpstreamProtocolError("upstream sent conflicting Content-Length values")
        (text,) = lengths
        return _length_framing(text)
    return _CLOSE


def plain_body_framing(method: str, status: int, length: bytes | None, chunked: bool) -> Framing:
    """:func:`body_framing` of headers whose framing ones are already read: at most one
    Content-Length (``length``, digits), at most one Transfer-Encoding, ``chunked`` (``chunked``)."""
    if method == "HEAD" or status < 200 or status in (204, 304):
        return _EMPTY
    if chunked:
        return _CHUNKED_DROPPED if length is not None else _CHUNKED
    return _CLOSE if length is None else _length_framing(length)


def _length_framing(text: bytes) -> Framing:
    framing = _LENGTHS.get(text)
    if framing is not None:
        return framing
    if not text.isdigit() or len(text) > 18:
        raise UpstreamProtocolError(f"upstream sent a malformed Content-Length: {text[:40]!r}")
    framing = Framing("length", int(text))
    if len(_LENGTHS) < 4096:
        _LENGTHS[text] = framing
    return framing


class ChunkScanner:
    """Tracks chunk boundaries across reads of a chunked body.

    ``feed(data, out)`` returns how many bytes of ``data`` belong to the body (all of them until
    the terminator arrives, then the index just past it, so the caller sees any excess) and,
    when ``out`` is a list, appends the de-framed data to it. :attr:`done` is True once the
    terminator (``0``, trailers, blank line) has been read; :attr:`terminator` is its bytes,
    as h11 needs them to complete its own state.
    """

    __slots__ = ("_left", "_line", "_state", "_trailers", "_zero_line", "done", "rewritten")

    def __init__(self) -> None:
        self._state = _SIZE
        self._left = 0  # bytes left in the current chunk
        self._line = b""  # a size or trailer line split across reads
        self._trailers = bytearray()  # the terminator so far: b"0...\r\n" and the trailer lines
        self._zero_line = 0  # the length of the last-chunk line, at the start of the terminator
        self.done = False
        # For pass-through: None while the reads pass on exactly as they came; else what the last
        # read becomes (the caller takes it and sets None again). A size line with an extension or
        # whitespace goes on as bare hex (the extension means nothing to Parkway, and h11-based
        # clients refuse the whitespace RFC 9112 §7.1.1 allows); a size line split across reads is
        # held until complete; the terminator is held whole, for the caller to filter its trailers.
        self.rewritten: bytes | None = None

    @property
    def terminator(self) -> bytes:
        return bytes(self._trailers)

    def trailer_lines(self) -> list[bytes]:
        """The trailer field lines of a complete terminator, each with its CRLF."""
        section = bytes(self._trailers[self._zero_line : -2])
        return section.splitlines(keepends=True)

    @property
    def canonical_terminator(self) -> bytes:
        """The terminator with a bare last-chunk line, as h11 parses it (h11 refuses the bad
        whitespace RFC 9112 §7.1.1 allows before an extension; the extension means nothing here)."""
        return b"0\r\n" + bytes(self._trailers[self._zero_line :])

    def feed(self, data: bytes, out: list[bytes] | None = None) -> int:
        if self._state == _SIZE and not self._line:
            # The common case, cheaply: a read holding exactly one whole chunk with a bare hex size.
            nl = data.find(b"\r\n", 0, 18)
            if nl > 0:
                size_text = data[:nl]
                if not size_text.translate(None, _HEX):
                    stop = nl + 2 + int(size_text, 16)
                    if stop + 2 == len(data) and stop > nl + 2 and data[stop:] == b"\r\n":
                        if out is not None:
                            out.append(data[nl + 2 : stop])
                        return stop + 2
        return self._feed(data, out)

    def _feed(self, data: bytes, out: list[bytes] | None) -> int:
        end = len(data)
        i = 0
        state, left = self._state, self._left
        passed: list[bytes] | None = None  # what goes on of this read, once anything differs from it
        emit = 0  # data[emit:] is not in ``passed`` yet
        if state == _TRAILER:  # the terminator is being held
            passed, emit = [], end
        while i < end:
            if state == _DATA:
                take = min(end - i, left)
                if out is not None:
                    out.append(data[i : i + take] if take != end or i else data)
                i += take
                left -= take
                if not left:
                    state = _DATA_END
            elif state == _SIZE or state == _TRAILER:
                nl = data.find(b"\n", i)
                if nl < 0:
                    if state == _SIZE:  # held until the line is whole
                        passed = [*(passed or ()), data[emit:i]]
                        emit = end
                    self._line += data[i:]
                    i = end
                    if len(self._line) > MAX_SIZE_LINE:
                        raise MalformedChunks("upstream sent an over-long chunk-size or trailer line")
                    break
                line = data[i : nl + 1]
                start = i
                split = bool(self._line)
                if split:
                    line, self._line = self._line + line, b""
                i = nl + 1
                if state == _SIZE:
                    match = _SIZE_LINE.fullmatch(line)
                    if match is None:
                        raise MalformedChunks(f"upstream sent a malformed chunk-size line: {line[:40]!r}")
                    digits = match[1]
                    left = int(digits, 16)
                    if left:
                        if split or len(line) != len(digits) + 2:  # held, or not bare hex: bare hex goes on
                            passed = [*(passed or ()), data[emit:start], digits + b"\r\n"]
                            emit = i
                        state = _DATA
                    else:  # the terminator: held from here, for the caller
                        passed = [*(passed or ()), data[emit:start]]
                        emit = end
                        self._trailers += line
                        self._zero_line = len(line)
                        state = _TRAILER
                else:
                    self._trailers += line
                    if len(self._trailers) > MAX_TRAILERS:
                        raise MalformedChunks("upstream sent over-long trailers")
                    if line == b"\r\n":
                        state = _DONE
                        self.done = True
                        break
                    if _TRAILER_LINE.fullmatch(line) is None:
                        raise MalformedChunks(f"upstream sent a malformed trailer line: {line[:40]!r}")
            elif state == _DATA_END:
                # The CRLF after a chunk's data, possibly split across reads.
                if self._line:  # b"\r" seen at the end of the previous read
                    if data[i : i + 1] != b"\n":
                        raise MalformedChunks("upstream sent chunk data longer than its size")
                    self._line = b""
                    i += 1
                    state = _SIZE
                elif data[i : i + 2] == b"\r\n":
                    i += 2
                    state = _SIZE
                elif data[i:] == b"\r":
                    self._line = b"\r"
                    i = end
                else:
                    raise MalformedChunks("upstream sent chunk data longer than its size")
            else:  # _DONE
                break
        self._state, self._left = state, left
        if passed is not None:
            if emit < i:
                passed.append(data[emit:i])
            self.rewritten = b"".join(passed)
        return i
