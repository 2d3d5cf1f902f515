"""Which implementation reads client connections: h11 (the reference, always installed) or
httptools (llhttp in C, used when installed: ``pip install 'parkway[fast]'``), as uvicorn picks
between its ``h11_impl`` and ``httptools_impl``; and llhttp's reading of one request head.

With httptools the head is parsed here in C (h11 spent ~80 µs on a signed head where llhttp
spends ~6); :mod:`proxy.http.framing` then checks it and decides its framing as h11 would, and
:mod:`proxy.http.httptools_impl` frames the body and the response. A head llhttp refuses is
given to h11 whole, and h11 decides (its refusal, or what llhttp is stricter about: a bare LF,
an obsolete folded line), so answers do not depend on the parser.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

try:
    import httptools
except ImportError:  # a bare install: h11 only
    httptools = None  # type: ignore[assignment]

HTTP_PARSERS = ("auto", "h11", "httptools")

# The end of a head, as h11 finds it (a bare LF is accepted there too).
_HEAD_END = re.compile(rb"\n\r?\n")
# h11's request line (RFC 9112 §3): method, target, version. llhttp also reads an HTTP/0.9 line
# (no version) and more.
_REQUEST_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])\r\n")


class HeadError(Exception):
    """The head is not valid HTTP/1.1 (llhttp's reason, for a 400)."""


def httptools_available() -> bool:
    return httptools is not None


def resolve(choice: str) -> str:
    """``auto`` → httptools when installed, else h11; asking for httptools without it is an error."""
    if choice == "h11":
        return "h11"
    if choice == "httptools" and httptools is None:
        raise ValueError("http = 'httptools' needs the httptools package: pip install 'parkway[fast]'")
    return "httptools" if httptools is not None else "h11"


def head_end(buffer: bytes | bytearray) -> int:
    """The length of the head at the start of ``buffer`` (through its blank line), or -1."""
    match = _HEAD_END.search(buffer)
    return -1 if match is None else match.end()


class ParsedHead(NamedTuple):  # a tuple: built for every request, four times cheaper than a frozen dataclass
    method: bytes
    target: bytes
    http_version: bytes  # b"1.1"
    headers: list[tuple[bytes, bytes]]  # names lower-cased, values without surrounding blanks (as h11)


class _Collector:
    """llhttp's callbacks: the header lines and the end of the head (the request line is
    :data:`_REQUEST_LINE`'s)."""

    __slots__ = ("headers", "complete")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_request_head(head: bytes) -> ParsedHead:
    """Parse one complete request head (through its blank line) with llhttp."""
    assert httptools is not None
    line = _REQUEST_LINE.match(head)
    if line is None:
        raise HeadError("not an HTTP/1.x request line")
    collector = _Collector()
    parser: Any = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # raised once the head of an upgrade request is complete
    except httptools.HttpParserError as exc:
        raise HeadError(str(exc) or type(exc).__name__) from None
    if not collector.complete:
        raise HeadError("incomplete request head")
    # llhttp read the line the pattern matched (one blank between its parts): the same three parts.
    method, target, version = line.groups()
    return ParsedHead(method, target, version, collector.headers)
