"""Shared test helpers: an independent upstream, a Parkway handle, raw HTTP and log watching.

The upstream speaks HTTP/1.1 with ``h11`` over plain ``trio`` sockets, on purpose without
``proxy.http_server``: the code under test must not be its own witness. It records every
request and runs one *behaviour* coroutine per request, so each test states how the
upstream answers (echo, SSE paced by the test, hang, close mid-stream, ...).
"""

from __future__ import annotations

import json
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import h11
import structlog
import trio
from signway_sdk import sign_url

from proxy.app import Parkway
from proxy.config import Config, CorsConfig, Credential, ServerConfig

SECRET = "s3cret"
UPSTREAM_KEY = "sk-upstream-key"
INJECTED = (("Authorization", f"Bearer {UPSTREAM_KEY}"),)

# Small limits so every timeout test finishes in well under a second.
TEST_SERVER = ServerConfig(
    listen=("127.0.0.1:0",),
    header_read_timeout=2.0,
    keepalive_timeout=5.0,
    client_body_timeout=2.0,
    client_write_timeout=2.0,
    upstream_connect_timeout=2.0,
    upstream_first_byte_timeout=5.0,
    upstream_idle_timeout=5.0,
    request_timeout=10.0,
    drain_timeout=5.0,
    # Every test upstream is on loopback, which the SSRF guard refuses by default
    # (test_e2e.py checks that refusal with this turned off).
    allow_private_upstreams=True,
)
TEST_CREDENTIAL = Credential("app", (SECRET,), INJECTED)

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


class Upstream:
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
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_for_requests(self, count: int = 1) -> list[Recorded]:
        """Return once ``count`` requests have arrived (each arrival sets an Event)."""
        while len(self.requests) < count:
            await self._arrival.wait()
        return self.requests

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            sock.listen(64)
            self.port = sock.getsockname()[1]
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                while True:
                    client, _ = await sock.accept()
                    nursery.start_soon(self._connection, trio.SocketStream(client))

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


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- Parkway --------------------------------------------------------------------------------


def make_config(
    *,
    credentials: tuple[Credential, ...] | None = None,
    cors: CorsConfig | None = None,
    **server_overrides: Any,
) -> Config:
    return Config(
        server=replace(TEST_SERVER, **server_overrides),
        credentials=(TEST_CREDENTIAL,) if credentials is None else credentials,
        cors=CorsConfig() if cors is None else cors,
    )


@dataclass
class RunningParkway:
    parkway: Parkway
    config: Config
    addresses: list[str]
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def port(self) -> int:
        return int(self.addresses[0].rpartition(":")[2])

    @property
    def base(self) -> str:
        return f"http://{self.addresses[0]}"

    def sign(
        self,
        proxy_url: str,
        *,
        method: str = "GET",
        id: str = "app",
        secret: str = SECRET,
        expiry: int = 60,
        headers: Mapping[str, str] | None = None,
        body: str | None = None,
        when: datetime | None = None,
    ) -> str:
        """A URL signed by the real ``signway_sdk`` for this Parkway (host = :attr:`base`)."""
        return sign_url(
            id=id,
            secret=secret,
            host=self.base,
            proxy_url=proxy_url,
            expiry=expiry,
            method=method,
            headers=dict(headers) if headers else None,  # the SDK adds Content-Length to it
            body=body,
            # Always given: the SDK's own default calls the deprecated datetime.utcnow().
            datetime_override=when or datetime.now(timezone.utc),
        )


class ParkwayCrashed(Exception):
    """``Parkway.run`` raised: the whole server died (the original traceback is in the message)."""


def _release_frames(exc: BaseException | None, seen: set[int]) -> None:
    """Clear the frames of ``exc``'s tracebacks, recursively, so what they hold is freed now."""
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            try:
                tb.tb_frame.clear()
            except RuntimeError:  # still executing
                pass
            tb = tb.tb_next
        for sub in getattr(exc, "exceptions", ()):
            _release_frames(sub, seen)
        _release_frames(exc.__cause__, seen)
        exc = exc.__context__


async def start_parkway(nursery: trio.Nursery, config: Config) -> RunningParkway:
    parkway = Parkway(config)
    stopped = trio.Event()

    async def run(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await parkway.run(task_status=task_status)
        except Exception as exc:
            # Fail the test at once with the full story, but drop the crashed frames: they
            # hold sockets and async generators whose ResourceWarnings would otherwise be
            # raised in whichever later test the garbage collector happens to run.
            text = "".join(traceback.format_exception(exc))
            _release_frames(exc, set())
            del exc
            raise ParkwayCrashed(f"Parkway.run crashed; the server is gone:\n{text}") from None
        finally:
            stopped.set()

    addresses = await nursery.start(run)
    return RunningParkway(parkway, config, addresses, stopped)


# --- raw HTTP -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def headers_length(self) -> int:
        return int(self.headers.get("content-length", 0))


def parse_raw_response(raw: bytes) -> RawResponse:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(rest)))
    return RawResponse(status, headers, rest[:length], raw)


async def read_response(stream: trio.SocketStream, *, close_within: float = 1.0) -> tuple[RawResponse, bool]:
    """Read one fixed-length response, then wait up to ``close_within`` s for the server to close.

    Returns the response and whether the connection was closed.
    """
    raw = b""
    while True:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if sep and len(rest) >= parse_raw_response(raw).headers_length():
            break
        data = await stream.receive_some(65536)
        assert data, f"connection closed before a complete response: {raw!r}"
        raw += data
    closed = False
    with trio.move_on_after(close_within):
        await read_until_eof(stream)
        closed = True
    return parse_raw_response(raw), closed


async def read_until_eof(stream: trio.SocketStream) -> bytes:
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


def request_bytes(method: str, url: str, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """One HTTP/1.1 request, framed by a real h11 client, for tests that hold the socket."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = h11.Connection(h11.CLIENT)
    head = [("host", parts.netloc), ("content-length", str(len(body))), *headers]
    return b"".join(
        conn.send(event)
        for event in (h11.Request(method=method, target=target, headers=head), h11.Data(data=body), h11.EndOfMessage())
        if not isinstance(event, h11.Data) or body
    )


async def stream_chunks(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    """A request body httpx sends with ``Transfer-Encoding: chunked``."""
    for chunk in chunks:
        yield chunk
        await trio.lowlevel.checkpoint()


# --- logs -----------------------------------------------------------------------------------


class LogWatcher:
    """Entries captured by ``structlog.testing.capture_logs``; tests can await a matching line."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._changed = trio.Event()

    def _notify(self, _logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        self._changed.set()
        self._changed = trio.Event()
        return event_dict

    def find(self, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.entries if all(e.get(k) == v for k, v in fields.items())]

    async def wait_for(self, **fields: Any) -> dict[str, Any]:
        """The first entry whose fields match, waiting for it to be logged."""
        while not (found := self.find(**fields)):
            await self._changed.wait()
        return found[0]


@contextmanager
def watch_logs():
    watcher = LogWatcher()
    # merge_contextvars first so request_id and credential are part of what is checked.
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars, watcher._notify]
    ) as entries:
        watcher.entries = entries
        yield watcher
