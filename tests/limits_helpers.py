"""Helpers for the end-to-end limits tests (tests/test_limits_e2e.py).

* :class:`Call`: one request on its own connection, spoken by a real ``h11`` client, so a test
  can hold a stream open (``read_until``) while it sends other requests, and see whether a
  response ended properly or was cut.
* :class:`HeldStreams`: an upstream behaviour whose SSE answer sends its first event at once and
  its (large) rest only when the test releases that stream, so "in flight" is a state the test
  controls rather than a race.
* :func:`signed`: a URL signed with Parkway's own signer, which adds extra signed parameters
  (``pw_user``, ``pw_single_use``) with ``params=``.
* :func:`redis_parkway_toml`: a Parkway config file whose limits live in a test redis-server.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from helpers import SECRET, SSE_HEADERS, Exchange, echo
from proxy.signing import sign_url

T = TypeVar("T")


def signed(
    base: str,
    proxy_url: str,
    *,
    id: str = "app",
    secret: str = SECRET,
    method: str = "GET",
    params: Mapping[str, str] | None = None,
    expiry: int = 60,
) -> str:
    """A URL for the Parkway at ``base``, signed by ``proxy.signing.sign_url`` (extra signed ``params``)."""
    return sign_url(
        id=id, secret=secret, host=base, proxy_url=proxy_url, expiry=expiry, method=method,
        params=dict(params) if params else None, datetime_override=datetime.now(timezone.utc),
    )


# --- the client ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool  # the body ended with its proper end (not cut short)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        return self.json()["error"]["code"]

    @property
    def message(self) -> str:
        return self.json()["error"]["message"]


class Call:
    """One request on a new connection (``Connection: close``), its answer read as it arrives."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.status: int | None = None
        self.headers: dict[str, str] = {}
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
        """Connect and send the whole request: ``body`` with Content-Length, or ``chunks`` chunked."""
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        call = cls(stream)
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [("host", parts.netloc), ("connection", "close"), *headers]
        events: list[h11.Data] = []
        if chunks is not None:
            head.append(("transfer-encoding", "chunked"))
            events = [h11.Data(data=chunk) for chunk in chunks]
        elif body is not None:
            head.append(("content-length", str(len(body))))
            events = [h11.Data(data=body)] if body else []
        data = call.conn.send(h11.Request(method=method, target=target, headers=head))
        for event in events:
            data += call.conn.send(event)
        data += call.conn.send(h11.EndOfMessage())
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # Parkway answered early and closed: what it said is still there to read
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

    async def finish(self) -> Reply:
        """Read the rest of the answer and close the connection."""
        try:
            await self.head()
            while await self._more():
                pass
        finally:
            await trio.aclose_forcefully(self.stream)
        assert self.status is not None
        return Reply(self.status, self.headers, bytes(self.body), self.complete)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def call(port: int, method: str, url: str, *, timeout: float = 5.0, **kwargs: Any) -> Reply:
    """One whole exchange, bounded by ``timeout``."""
    with trio.fail_after(timeout):
        opened = await Call.open(port, method, url, **kwargs)
        return await opened.finish()


# --- the upstream behaviour -----------------------------------------------------------------------


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


# --- polling other processes ----------------------------------------------------------------------


async def poll(check: Callable[[], Awaitable[T]], *, timeout: float, interval: float = 0.05) -> T:
    """Call ``check`` until it returns something truthy, for at most ``timeout`` seconds.

    Only for what another process decides on its own clock (a Parkway subprocess trying
    Redis again after ``retry_interval``); never for something this process can await.
    """
    with trio.fail_after(timeout):
        while not (result := await check()):
            await trio.sleep(interval)
        return result


# --- configuration files --------------------------------------------------------------------------


def redis_parkway_toml(
    *,
    port: int,
    admin_port: int,
    redis_url: str,
    failure_policy: str,
    credentials: Iterable[Mapping[str, Any]],
    retry_interval: float = 0.2,
) -> str:
    """A Parkway config whose limits and single-use set live in the Redis at ``redis_url``.

    ``credentials``: one mapping per ``[[credentials]]`` block; values are written as TOML
    (strings, booleans, integers, and ``limits`` as an inline table).
    """
    lines = [
        "[server]",
        f"listen = [{json.dumps(f'127.0.0.1:{port}')}]",
        "drain_timeout = 1",
        "upstream_first_byte_timeout = 5",
        "upstream_idle_timeout = 5",
        "request_timeout = 15",
        "allow_private_upstreams = true  # the test upstream is on loopback",
        "",
        "[admin]",
        f"listen = [{json.dumps(f'127.0.0.1:{admin_port}')}]",
        "",
        "[state]",
        'backend = "redis"',
        f"url = {json.dumps(redis_url)}",
        'key_prefix = "parkway-e2e:"',
        f"failure_policy = {json.dumps(failure_policy)}",
        "timeout = 0.5",
        f"retry_interval = {retry_interval}",
        "",
    ]
    for credential in credentials:
        lines.append("[[credentials]]")
        for key, value in credential.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


# --- an upstream that sees partial bodies -----------------------------------------------------------


class BodySink:
    """An HTTP/1.1 upstream that records, per connection, the request body bytes that arrived
    and whether the request was complete (it answers 200 only to a complete one).

    helpers.Upstream records complete requests only; this one also shows a body cut short.
    """

    def __init__(self) -> None:
        self.connections = 0
        self.bodies: list[bytes] = []  # one per ended connection: the body bytes received
        self.complete: list[bytes] = []  # bodies of requests that arrived whole
        self.ended = trio.Event()  # set each time a connection has ended (then replaced)
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        body = bytearray()
        try:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:  # the proxy hung up in the middle of the body
                    return
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    conn.receive_data(data)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self.complete.append(bytes(body))
                    data = conn.send(h11.Response(status_code=200, headers=[("content-length", "2")]))
                    await stream.send_all(data + conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    return
        finally:
            self.bodies.append(bytes(body))
            await trio.aclose_forcefully(stream)
            self.ended.set()
            self.ended = trio.Event()
