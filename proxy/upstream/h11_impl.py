"""The upstream face on h11, the reference implementation (see :mod:`proxy.upstream.wire`).

h11 writes the request and reads every response head; it de-frames the bodies that are not
chunked, and completes its state with a chunked body's terminator (the bytes themselves are
:class:`~proxy.http.chunked.ChunkScanner`'s). Its states decide whether the connection is reused.
"""

from __future__ import annotations

import h11

from ..http.chunked import ChunkScanner, body_framing
from ..http.h11_impl import header_pairs
from .wire import BrokenResponse, Headers, RequestRefused, ResponseHead, deframe_chunked


class H11HTTP:
    """:class:`~proxy.upstream.wire.UpstreamHTTP` on one ``h11.Connection(h11.CLIENT)``."""

    __slots__ = ("conn", "method", "scanner")

    def __init__(self) -> None:
        self.conn = h11.Connection(h11.CLIENT)
        self.method = "GET"
        self.scanner: ChunkScanner | None = None  # a chunked body de-framed here (the cache's reads)

    def request(self, method: str, target: bytes, headers: Headers) -> bytes:
        self.method = method
        try:
            return self.conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        except h11.LocalProtocolError as exc:
            raise RequestRefused(str(exc)) from None

    def data(self, data: bytes) -> bytes:
        try:
            return self.conn.send(h11.Data(data=data)) or b""
        except h11.LocalProtocolError as exc:
            raise RequestRefused(str(exc)) from None

    def end(self) -> bytes:
        try:
            return self.conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            raise RequestRefused(str(exc)) from None

    def read_head(self, head: bytes) -> ResponseHead:
        conn = self.conn
        try:
            conn.receive_data(head)
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BrokenResponse(str(exc)) from None
        if type(event) is h11.InformationalResponse:
            return ResponseHead(event.status_code, event.http_version, header_pairs(event.headers), None)
        if type(event) is not h11.Response:
            raise BrokenResponse("not a response")
        headers = header_pairs(event.headers)
        framing = body_framing(self.method, event.status_code, headers)
        if framing.kind == "chunked":
            self.scanner = ChunkScanner()
        return ResponseHead(event.status_code, event.http_version, headers, framing)

    def deframe(self, data: bytes, out: list[bytes]) -> int | None:
        if self.scanner is not None:  # chunks are the scanner's on both implementations
            return deframe_chunked(self.scanner, data, out, self.end_chunked)
        conn = self.conn
        try:
            conn.receive_data(data)
            while True:
                event = conn.next_event()
                if type(event) is h11.Data:
                    out.append(bytes(event.data))
                elif type(event) is h11.EndOfMessage:
                    return len(conn.trailing_data[0])
                else:
                    return None
        except h11.RemoteProtocolError as exc:
            raise BrokenResponse(str(exc)) from None

    def end_bodiless(self, initial: bytes) -> int:
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BrokenResponse(str(exc)) from None
        return len(initial) if type(event) is h11.EndOfMessage else 1

    def end_chunked(self, terminator: bytes) -> bool:
        conn = self.conn
        try:
            conn.receive_data(terminator)
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BrokenResponse(str(exc)) from None
        return type(event) is h11.EndOfMessage

    def reusable(self) -> bool:
        conn = self.conn
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def start_next_cycle(self) -> None:
        self.conn.start_next_cycle()
        self.scanner = None
