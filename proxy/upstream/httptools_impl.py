"""The upstream face's fast implementation: a hand-written request head and llhttp (httptools)
for the response head, with the body framing of :mod:`proxy.upstream.wire`.

Every decision is h11's, written out in :mod:`proxy.upstream.wire` and proved against h11 by
tests/unit/upstream/test_wire.py (Hypothesis, the same heads to both). A response head llhttp
reads is taken only when it is also in the plain part of h11's grammar (:func:`~proxy.upstream.wire.plain_head`)
and its framing headers are the plain ones; any other head (a bare LF, a folded line, a
repeated length...), and a chunked body's trailers, go to h11 whole, which decides: the answer
never depends on the parser.
"""

from __future__ import annotations

from typing import Any

import h11
import httptools

from ..http.chunked import ChunkScanner, Framing, body_framing, plain_body_framing
from ..http.h11_impl import header_pairs
from .wire import (
    PLAIN_HEAD,
    BodyReader,
    BrokenResponse,
    Headers,
    RequestBody,
    RequestRefused,
    ResponseHead,
    deframe_chunked,
    keep_alive,
    normalized,
    request_head,
)

_CANONICAL_END = b"0\r\n\r\n"


class _Collector:
    """llhttp's callbacks: the header lines, nothing else."""

    __slots__ = ("complete", "headers")

    def __init__(self) -> None:
        self.headers: Headers = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        self.complete = True


def _llhttp_head(head: bytes) -> tuple[int, bytes, Headers, bytes | None, bool, bool] | None:
    """Status, version and headers of a plain head, with what :func:`~proxy.upstream.wire.normalized`
    saw of them, or None when it is not one llhttp takes."""
    if PLAIN_HEAD.fullmatch(head) is None:  # plain_head, without its frame
        return None
    collector = _Collector()
    parser: Any = httptools.HttpResponseParser(collector)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # raised once the head of a 101 is complete
    except httptools.HttpParserError:
        return None
    if not collector.complete:
        return None
    plain = normalized(collector.headers)
    status = int(head[9:12])  # the plain status line: b"HTTP/x.y NNN"
    if plain is None or status < 100 or status == 101:  # 101: h11's refusal (nothing proposed it)
        return None
    headers, length, chunked, connection = plain
    return status, head[5:8], headers, length, chunked, connection


def _h11_reader(method: str) -> h11.Connection:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "upstream")]))
    conn.send(h11.EndOfMessage())
    return conn


class HttptoolsHTTP:
    """:class:`~proxy.upstream.wire.UpstreamHTTP` without h11 on the common path."""

    __slots__ = ("body", "method", "our_done", "our_keep_alive", "reader", "scanner", "their_done", "their_keep_alive")

    def __init__(self) -> None:
        self.method = "GET"
        self.body: RequestBody | None = None
        self.reader: BodyReader | None = None
        self.scanner: ChunkScanner | None = None
        self.our_done = self.their_done = False
        self.our_keep_alive = self.their_keep_alive = True

    def request(self, method: str, target: bytes, headers: Headers) -> bytes:
        head, framing = request_head(method, target, headers)
        self.method = method
        self.body = RequestBody(framing)
        self.our_keep_alive = framing.keep_alive
        return head

    def data(self, data: bytes) -> bytes:
        if self.body is None or self.our_done:
            raise RequestRefused("Can't send data when our state is not SEND_BODY")
        return self.body.data(data)

    def end(self) -> bytes:
        if self.body is None or self.our_done:
            raise RequestRefused("Can't send EndOfMessage when our state is not SEND_BODY")
        out = self.body.end()
        self.our_done = True
        return out

    def read_head(self, head: bytes) -> ResponseHead:
        parsed = _llhttp_head(head)
        if parsed is None:
            return self._h11_head(head)
        status, version, headers, length, chunked, connection = parsed
        if status < 200:
            return ResponseHead(status, version, headers, None)
        # The framing and keep-alive from what the header pass saw: no pass of their own.
        framing = plain_body_framing(self.method, status, length, chunked)
        alive = keep_alive(version, headers) if connection else version >= b"1.1"
        return self._final(status, version, headers, framing, alive)

    def _h11_head(self, head: bytes) -> ResponseHead:
        """A head the fast path does not take: h11's reading, or its refusal."""
        conn = _h11_reader(self.method)
        try:
            conn.receive_data(head)
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BrokenResponse(str(exc)) from None
        if type(event) is not h11.Response and type(event) is not h11.InformationalResponse:
            raise BrokenResponse("not a response")
        return self._head(event.status_code, event.http_version, header_pairs(event.headers))

    def _head(self, status: int, version: bytes, headers: Headers) -> ResponseHead:
        if status < 200:
            return ResponseHead(status, version, headers, None)
        framing = body_framing(self.method, status, headers)
        return self._final(status, version, headers, framing, keep_alive(version, headers))

    def _final(self, status: int, version: bytes, headers: Headers, framing: Framing, alive: bool) -> ResponseHead:
        self.their_keep_alive = alive
        if framing.kind == "chunked":
            self.scanner = ChunkScanner()
        else:
            self.reader = BodyReader(framing)
        return ResponseHead(status, version, headers, framing)

    def deframe(self, data: bytes, out: list[bytes]) -> int | None:
        if self.scanner is not None:
            return deframe_chunked(self.scanner, data, out, self.end_chunked)
        assert self.reader is not None
        excess = self.reader.feed(data, out)
        if excess is not None:
            self.their_done = True
        return excess

    def end_bodiless(self, initial: bytes) -> int:
        self.their_done = True
        return len(initial)

    def end_chunked(self, terminator: bytes) -> bool:
        if terminator != _CANONICAL_END:  # trailers: h11 reads them (rare)
            conn = _h11_reader(self.method)
            try:
                conn.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + terminator)
                conn.next_event()
                if type(conn.next_event()) is not h11.EndOfMessage:
                    return False
            except h11.RemoteProtocolError as exc:
                raise BrokenResponse(str(exc)) from None
        self.their_done = True
        return True

    def reusable(self) -> bool:
        return self.our_done and self.their_done and self.our_keep_alive and self.their_keep_alive

    def start_next_cycle(self) -> None:
        self.body = self.reader = self.scanner = None
        self.our_done = self.their_done = False
        self.our_keep_alive = self.their_keep_alive = True
