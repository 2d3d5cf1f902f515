"""A raw HTTP/1.1 client for tests that hold the socket: requests framed and replies parsed by a
real ``h11`` client (chunked framing included), on TCP or on any trio stream.

:class:`Call` reads a reply as it arrives, so a test can keep a stream open (``read_until``)
while it sends other requests, and tell a reply that ended properly from one cut short;
:func:`exchange` and :func:`send_raw` also count the bytes that went over the wire.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(frozen=True)
class Reply:
    """One response as the client received it."""

    status: int
    headers: dict[str, str]  # lower-case name -> value (the last one of a repeated name)
    header_list: tuple[tuple[bytes, bytes], ...]  # every header, in order
    body: bytes  # de-chunked
    complete: bool  # the body ended with its proper end (not cut short)
    closed: bool = False  # parse_response: the connection closed right after, nothing trailing
    sent: int = 0  # exchange: bytes written to the socket
    received: int = 0  # exchange: bytes read from it, until the server closed it
    reason: bytes = b""  # the status line's reason phrase

    def json(self) -> Any:
        return json.loads(self.body)

    def values(self, name: str) -> list[bytes]:
        """Every value of header ``name``, in order."""
        key = name.lower().encode()
        return [v for n, v in self.header_list if n == key]

    @property
    def code(self) -> str:
        return self.json()["error"]["code"]

    @property
    def message(self) -> str:
        return self.json()["error"]["message"]


def request_bytes(
    method: str,
    url: str,
    body: bytes | None = b"",
    *,
    chunks: Iterable[bytes] | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """One request framed by a real h11 client: ``body`` with Content-Length (``None``: no
    body and no framing header), or ``chunks`` with ``Transfer-Encoding: chunked``."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = [("host", parts.netloc), *headers]
    events: list[h11.Data] = []
    if chunks is not None:
        head.append(("transfer-encoding", "chunked"))
        events = [h11.Data(data=chunk) for chunk in chunks]
    elif body is not None:
        head.append(("content-length", str(len(body))))
        events = [h11.Data(data=body)] if body else []
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(h11.Request(method=method, target=target, headers=head)) or b""
    for event in events:
        data += conn.send(event) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


def _client_awaiting(method: str) -> h11.Connection:
    """An h11 client that has sent a ``method`` request, so it parses the reply to one."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x"), ("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    return conn


class Call:
    """One reply read from ``stream`` as it arrives, by an h11 client awaiting it."""

    def __init__(self, stream: trio.abc.Stream, method: str = "GET"):
        self.stream = stream
        self.conn = _client_awaiting(method)
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.header_list: tuple[tuple[bytes, bytes], ...] = ()
        self.reason = b""
        self.body = bytearray()
        self.complete = False
        self.ended = False

    @classmethod
    async def open(
        cls,
        port: int,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        chunks: Iterable[bytes] | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> Call:
        """Connect to 127.0.0.1:``port`` and send the whole request (``Connection: close``)."""
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        call = cls(stream, method)
        data = request_bytes(method, url, body, chunks=chunks, headers=[("connection", "close"), *headers])
        try:
            await stream.send_all(data)
        except _GONE:
            pass  # the server answered early and closed: what it said is still there to read
        return call

    async def _event(self) -> Any:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:  # closed in the middle of the body: a cut stream
                return h11.ConnectionClosed()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            self.conn.receive_data(data)

    async def head(self) -> int:
        """The response status, once its head has arrived."""
        while self.status is None:
            event = await self._event()
            if isinstance(event, h11.Response):
                self.status = event.status_code
                self.header_list = tuple(event.headers)
                self.reason = event.reason
                self.headers = {n.decode(): v.decode("latin-1") for n, v in event.headers}
            elif not isinstance(event, h11.InformationalResponse):
                raise AssertionError(f"no response head, got {event!r}")
        return self.status

    async def _more(self) -> bool:
        """Read the next body event; False once the body has ended (properly or not)."""
        if self.ended:
            return False
        event = await self._event()
        if isinstance(event, h11.Data):
            self.body += event.data
            return True
        self.ended = True
        self.complete = isinstance(event, h11.EndOfMessage)
        return False

    async def read_until(self, data: bytes) -> None:
        """Return once the body received so far contains ``data`` (the stream stays open)."""
        await self.head()
        while data not in self.body:
            if not await self._more():
                raise AssertionError(f"body ended without {data!r}: {bytes(self.body)[:300]!r}")

    async def reply(self) -> Reply:
        """Read the rest of the reply; the connection stays as it is."""
        await self.head()
        while await self._more():
            pass
        assert self.status is not None
        return Reply(self.status, self.headers, self.header_list, bytes(self.body), self.complete, reason=self.reason)

    async def finish(self) -> Reply:
        """Read the rest of the reply and close the connection."""
        try:
            return await self.reply()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def call(port: int, method: str, url: str, *, timeout: float = 5.0, **kwargs: Any) -> Reply:
    """One whole exchange on a new connection (:meth:`Call.open`), bounded by ``timeout``."""
    with trio.fail_after(timeout):
        opened = await Call.open(port, method, url, **kwargs)
        return await opened.finish()


def parse_response(raw: bytes, method: str = "GET") -> Reply:
    """Decode everything a server sent before closing: one complete reply to ``method``."""
    conn = _client_awaiting(method)
    conn.receive_data(raw)
    conn.receive_data(b"")
    head, body = None, bytearray()
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            break
        elif not isinstance(event, h11.InformationalResponse):
            raise AssertionError(f"incomplete response ({event!r}): {raw[:300]!r}")
    try:
        closed = conn.next_event() == h11.ConnectionClosed()
    except h11.RemoteProtocolError:  # bytes after the end of the reply
        closed = False
    headers = {n.decode(): v.decode("latin-1") for n, v in head.headers}
    return Reply(head.status_code, headers, tuple(head.headers), bytes(body), True, closed, reason=head.reason)


async def read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = bytearray()
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:  # RST after the response: the data read so far stands
            return bytes(out)
        if not data:
            return bytes(out)
        out += data


async def read_response(stream: trio.abc.Stream, *, close_within: float = 5.0) -> tuple[Reply, bool]:
    """Read one reply, then wait up to ``close_within`` s for the server to close.

    Returns the reply and whether the connection was closed (a server that keeps it open
    costs the test ``close_within``; one that closes returns at once).
    """
    reply = await Call(stream).reply()
    closed = False
    with trio.move_on_after(close_within):
        await read_until_eof(stream)
        closed = True
    return reply, closed


async def exchange(
    port: int, method: str, url: str, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()
) -> Reply:
    """Send one request on a new connection (``Connection: close``) and read until the server
    closes it; the reply counts the bytes sent and received."""
    request = request_bytes(method, url, body, headers=[("connection", "close"), *headers])
    sent, raw = await send_raw(port, request)
    reply = parse_response(raw, method)
    return replace(reply, sent=sent, received=len(raw))


async def send_raw(port: int, data: bytes) -> tuple[int, bytes]:
    """Write ``data`` as is on a new connection; return the bytes written and everything read back."""
    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(data)
            return len(data), await read_until_eof(stream)


async def stream_chunks(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    """A request body httpx sends with ``Transfer-Encoding: chunked``."""
    for chunk in chunks:
        yield chunk
        await trio.lowlevel.checkpoint()
