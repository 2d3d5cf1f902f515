"""The in-test upstream: HTTP/1.1 with ``h11`` over plain ``trio`` sockets on 127.0.0.1 port 0.

Written on purpose without ``proxy.http.connection``: the code under test must not be its own
witness. It records every request and runs one *behaviour* coroutine per request, so each
test states how the upstream answers (echo, SSE paced by the test, streams held until the
test releases them, hang, close mid-stream, ...).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from support.loopback import LoopbackServer

_NETWORK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


# --- the upstream -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """One request as the upstream received it."""

    method: str
    target: str
    headers: dict[str, str]  # lower-case name -> value (repeats joined with ", ")
    header_list: list[tuple[str, str]]
    body: bytes
    peer_port: int  # the proxy's side of the upstream connection

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


class UpstreamGone(Exception):
    """The proxy closed the upstream connection while the behaviour was still answering."""


class Exchange:
    """One request/response on an upstream connection, as a behaviour sees it."""

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection, request: Recorded):
        self.stream = stream
        self.conn = conn
        self.request = request
        self.sent_body = bytearray()  # body bytes as written, before chunked framing
        self.closed = False  # the behaviour dropped the connection itself
        self.proxy_left = False  # the proxy closed the connection before the response ended

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        try:
            await self.stream.send_all(data)
        except _NETWORK_ERRORS as exc:
            raise UpstreamGone(str(exc)) from exc

    async def send_head(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        await self._send(h11.Response(status_code=status, headers=list(headers)))

    async def send_data(self, data: bytes) -> None:
        self.sent_body += data
        await self._send(h11.Data(data=data))

    async def send_end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def respond(self, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        headers = [*headers, ("content-length", str(len(body)))]
        await self.send_head(status, headers)
        await self.send_data(body)
        await self.send_end()

    async def close(self) -> None:
        """Drop the connection at once, wherever the response is (a crashed upstream)."""
        self.closed = True
        await trio.aclose_forcefully(self.stream)


Behaviour = Callable[[Exchange], Awaitable[None]]


def echo_payload(request: Recorded) -> dict[str, Any]:
    return {
        "method": request.method,
        "target": request.target,
        "headers": request.headers,
        "body": request.body.decode("latin-1"),
    }


async def echo(ex: Exchange) -> None:
    """Default: 200 with a JSON description of what arrived, fixed length."""
    body = json.dumps(echo_payload(ex.request)).encode()
    await ex.respond(200, [("content-type", "application/json"), ("x-upstream", "echo")], body)


def respond_with(status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> Behaviour:
    async def behaviour(ex: Exchange) -> None:
        await ex.respond(status, headers, body)

    return behaviour


async def hang(ex: Exchange) -> None:
    """Never answer (until the proxy gives up and closes the connection)."""
    await trio.sleep_forever()


SSE_HEADERS = (("content-type", "text/event-stream"), ("cache-control", "no-cache"))


def sse_from(events: trio.MemoryReceiveChannel[bytes]) -> Behaviour:
    """SSE paced by the test: each item sent on the channel goes out as one chunk; closing it ends the body."""

    async def behaviour(ex: Exchange) -> None:
        await ex.send_head(200, SSE_HEADERS)
        async with events:
            async for event in events:
                await ex.send_data(event)
        await ex.send_end()

    return behaviour


def sse_then(events: Iterable[bytes], then: str) -> Behaviour:
    """Send ``events`` as SSE chunks, then ``"hang"`` (idle mid-stream) or ``"close"`` (crash)."""

    async def behaviour(ex: Exchange) -> None:
        await ex.send_head(200, SSE_HEADERS)
        for event in events:
            await ex.send_data(event)
        if then == "close":
            await ex.close()
        else:
            await trio.sleep_forever()

    return behaviour


class Upstream(LoopbackServer):
    """An HTTP/1.1 upstream on 127.0.0.1, port 0; set ``behaviour`` before the request arrives."""

    def __init__(self, behaviour: Behaviour = echo):
        self.behaviour = behaviour
        self.requests: list[Recorded] = []
        self.connections = 0
        self.exchanges: list[Exchange] = []
        self.disconnected = trio.Event()  # the proxy closed a connection before the response ended
        self._arrival = trio.Event()
        self.port = 0

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_for_requests(self, count: int = 1) -> list[Recorded]:
        """Return once ``count`` requests have arrived (each arrival sets an Event)."""
        while len(self.requests) < count:
            await self._arrival.wait()
        return self.requests

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        peer_port = stream.socket.getpeername()[1]
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(stream, conn, peer_port)
                if request is None:
                    return
                self.requests.append(request)
                self._arrival.set()
                self._arrival = trio.Event()
                ex = Exchange(stream, conn, request)
                self.exchanges.append(ex)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_disconnect, ex, nursery.cancel_scope)
                    try:  # caught here: out of the nursery it would come wrapped in an ExceptionGroup
                        await self.behaviour(ex)
                    except UpstreamGone:
                        ex.proxy_left = True
                    nursery.cancel_scope.cancel()
                if ex.proxy_left:
                    self.disconnected.set()
                if ex.closed or ex.proxy_left or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        finally:
            await trio.aclose_forcefully(stream)

    async def _read_request(self, stream: trio.SocketStream, conn: h11.Connection, peer_port: int) -> Recorded | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except _NETWORK_ERRORS:
                    data = b""
                conn.receive_data(data)
                if not data and head is None and conn.their_state is h11.IDLE:
                    return None
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in head.headers]
                headers: dict[str, str] = {}
                for name, value in pairs:
                    headers[name] = f"{headers[name]}, {value}" if name in headers else value
                return Recorded(
                    method=head.method.decode(),
                    target=head.target.decode("latin-1"),
                    headers=headers,
                    header_list=pairs,
                    body=bytes(body),
                    peer_port=peer_port,
                )
            else:  # ConnectionClosed, PAUSED: the proxy left
                return None

    @staticmethod
    async def _watch_disconnect(ex: Exchange, scope: trio.CancelScope) -> None:
        """While answering, notice the proxy closing its side (a receive returning b"")."""
        while True:
            try:
                data = await ex.stream.receive_some(65536)
            except _NETWORK_ERRORS:
                data = b""
            if not data:
                ex.proxy_left = not ex.closed
                scope.cancel()  # stop the behaviour: nobody is listening any more
                return
            ex.conn.receive_data(data)  # a pipelined next request: keep it for h11


# --- streams held until the test releases them ---------------------------------------------------


def stream_key(target: str) -> str | None:
    """The ``hold`` query parameter of an upstream request target, which names a held stream."""
    values = parse_qs(urlsplit(target).query).get("hold")
    return values[0] if values else None


class HeldStreams:
    """SSE streams the test releases one by one; requests without ``?hold=KEY`` get the echo.

    Each stream sends a small first event at once, then waits for :meth:`release` (or
    :meth:`release_all`) before sending a large rest with CRLF framing and UTF-8, so relaying
    it byte for byte takes many chunks. :meth:`expected` is the whole body for one key.
    """

    REST_BYTES = 24_000

    def __init__(self) -> None:
        self._events: dict[str, trio.Event] = {}
        self.all_released = False

    @classmethod
    def parts(cls, key: str) -> tuple[bytes, bytes]:
        first = b'data: {"id":"%s","choices":[{"delta":{"content":"H\xc3\xa9"}}]}\n\n' % key.encode()
        pad = hashlib.sha256(key.encode()).hexdigest().encode()
        filler = (pad * (cls.REST_BYTES // len(pad) + 1))[: cls.REST_BYTES]
        rest = b"event: message\r\nid: 2\r\ndata: " + filler + b"\r\n\r\ndata: [DONE]\n\n"
        return first, rest

    @classmethod
    def first(cls, key: str) -> bytes:
        return cls.parts(key)[0]

    @classmethod
    def expected(cls, key: str) -> bytes:
        return b"".join(cls.parts(key))

    def _event(self, key: str) -> trio.Event:
        event = self._events.setdefault(key, trio.Event())
        if self.all_released:
            event.set()
        return event

    def release(self, key: str) -> None:
        self._event(key).set()

    def release_all(self) -> None:
        self.all_released = True
        for event in self._events.values():
            event.set()

    async def __call__(self, ex: Exchange) -> None:
        key = stream_key(ex.request.target)
        if key is None:
            await echo(ex)
            return
        first, rest = self.parts(key)
        await ex.send_head(200, SSE_HEADERS)
        await ex.send_data(first)
        await self._event(key).wait()
        await ex.send_data(rest)
        await ex.send_end()
