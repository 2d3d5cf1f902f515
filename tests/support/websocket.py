"""WebSocket peers for the tests: a stand-in for the Realtime API, raw wsproto peers, a harness.

* :class:`RealtimeUpstream` is a trio-websocket server on loopback standing in for OpenAI's
  Realtime API: it refuses a handshake without the injected key (with a body quoting part of
  the key, as OpenAI does, so tests can check it never reaches the client), picks a
  subprotocol, sends ``session.created``, echoes what it gets and streams server events
  ending in ``response.done`` with usage when asked for a response. Each session records
  what the upstream saw: headers, offered subprotocols, messages, the close it received.
* :class:`RawPeer` speaks wsproto over a plain stream, for what trio-websocket will not do
  (send fragments, drop the TCP connection without a close frame, answer a bad handshake).
* :class:`SessionHarness` parses a request head with h11 (as the HTTP server does) and hands
  the connection to :class:`proxy.websocket.session.WebSocketProxy`, so the shell is tested alone.
"""

from __future__ import annotations

import json
import ssl
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h11
import trio
import wsproto
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
    wrap_client_stream,
)
from wsproto.events import AcceptConnection, Event, Request

from proxy.errors import ParkwayError, error_response
from proxy.upstream.ssrf import AddressPolicy
from proxy.websocket.policy import (
    WebSocketConfig,
    handshake_request,
    parse_subprotocols,
    split_subprotocols,
    upstream_target,
)
from proxy.websocket.session import SessionPlan, SessionReport, WebSocketProxy
from support.signing import UPSTREAM_KEY

SUPPORTED_SUBPROTOCOLS = ("realtime",)
USAGE = {"total_tokens": 18, "input_tokens": 11, "output_tokens": 7}

_NETWORK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def event(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


# --- the upstream ----------------------------------------------------------------------------------


@dataclass
class UpstreamSession:
    """One accepted session as the upstream saw it."""

    ws: WebSocketConnection
    path: str
    headers: dict[str, str]
    subprotocols: tuple[str, ...]
    received: list[str | bytes] = field(default_factory=list)
    close: CloseReason | None = None  # the close the upstream received (or 1006)
    ended: trio.Event = field(default_factory=trio.Event)
    _arrived: trio.Event = field(default_factory=trio.Event)

    async def receive(self) -> str | bytes:
        message = await self.ws.get_message()
        self.received.append(message)
        self._arrived.set()
        self._arrived = trio.Event()
        return message

    async def wait_received(self, count: int) -> list[str | bytes]:
        while len(self.received) < count:
            await self._arrived.wait()
        return self.received


Behaviour = Callable[[UpstreamSession], Awaitable[None]]


def _type_of(message: str) -> object:
    try:
        parsed = json.loads(message)
    except ValueError:
        return None
    return parsed.get("type") if isinstance(parsed, dict) else None


async def realtime(session: UpstreamSession) -> None:
    """The Realtime API in miniature: events on ``response.create``, echo otherwise."""
    await session.ws.send_message(event("session.created", session={"id": "sess_1"}))
    while True:
        message = await session.receive()
        if isinstance(message, str) and _type_of(message) == "response.create":
            for i in range(3):
                await session.ws.send_message(event("response.output_audio.delta", delta="AAAA" * 64, n=i))
            await session.ws.send_message(event("response.done", response={"id": "resp_1", "usage": USAGE}))
        else:
            await session.ws.send_message(message)


async def echo(session: UpstreamSession) -> None:
    while True:
        await session.ws.send_message(await session.receive())


class RealtimeUpstream:
    """A trio-websocket server on 127.0.0.1, port 0; set ``behaviour`` before the session opens."""

    def __init__(
        self, behaviour: Behaviour = realtime, *, key: str = UPSTREAM_KEY, ssl_context: ssl.SSLContext | None = None
    ):
        self.behaviour = behaviour
        self.key = key
        self.ssl_context = ssl_context
        self.handshakes: list[dict[str, str]] = []  # headers of every handshake, refused ones too
        self.sessions: list[UpstreamSession] = []
        self.port = 0
        self._arrival = trio.Event()

    @property
    def url(self) -> str:
        if self.ssl_context is not None:
            return f"wss://localhost:{self.port}/v1/realtime?model=gpt-realtime"
        return f"ws://127.0.0.1:{self.port}/v1/realtime?model=gpt-realtime"

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_websocket(
                    self._handler, "127.0.0.1", 0, self.ssl_context, max_message_size=64 << 20, task_status=task_status
                )
            )
            self.port = server.port
            task_status.started(self)

    async def wait_session(self, index: int = 0) -> UpstreamSession:
        while len(self.sessions) <= index:
            await self._arrival.wait()
        return self.sessions[index]

    async def _handler(self, request: WebSocketRequest) -> None:
        headers = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in request.headers}
        self.handshakes.append(headers)
        if headers.get("authorization") != f"Bearer {self.key}":
            body = json.dumps({"error": {"message": f"Incorrect API key provided: sk-...{self.key[-4:]}"}})
            await request.reject(401, body=body.encode())
            return
        protocol = next((p for p in request.proposed_subprotocols if p in SUPPORTED_SUBPROTOCOLS), None)
        ws = await request.accept(subprotocol=protocol)
        session = UpstreamSession(ws, request.path, headers, request.proposed_subprotocols)
        self.sessions.append(session)
        self._arrival.set()
        self._arrival = trio.Event()
        try:
            await self.behaviour(session)
        except ConnectionClosed as exc:
            session.close = exc.reason
        finally:
            if session.close is None:
                session.close = ws.closed
            session.ended.set()


# --- raw wsproto peers ------------------------------------------------------------------------------


class RawPeer:
    """wsproto over a trio stream, one event at a time."""

    def __init__(self, stream: trio.abc.Stream, role: wsproto.ConnectionType):
        self.stream = stream
        self.ws = wsproto.WSConnection(role)
        self._events: deque[Event] = deque()

    async def send(self, *events: Event) -> None:
        await self.stream.send_all(b"".join(self.ws.send(e) for e in events))

    async def next_event(self) -> Event | None:
        """The next event, or None once the peer closed the TCP connection."""
        while not self._events:
            try:
                data = await self.stream.receive_some(65536)
            except _NETWORK_ERRORS:
                data = b""
            self.ws.receive_data(data or None)
            self._events.extend(self.ws.events())
            if not data and not self._events:
                return None
        return self._events.popleft()

    @classmethod
    async def connect(
        cls,
        port: int,
        target: str = "/",
        *,
        subprotocols: tuple[str, ...] = (),
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> tuple[RawPeer, Event | None]:
        """A client: TCP to ``port``, the handshake, and its answer (AcceptConnection or RejectConnection)."""
        peer = cls(await trio.open_tcp_stream("127.0.0.1", port), wsproto.ConnectionType.CLIENT)
        await peer.send(
            Request(
                host=f"127.0.0.1:{port}", target=target, subprotocols=list(subprotocols), extra_headers=headers or []
            )
        )
        return peer, await peer.next_event()


async def raw_server(
    handle: Callable[[trio.SocketStream], Awaitable[None]], *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """A TCP server on 127.0.0.1 running ``handle`` per connection (upstreams that misbehave)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def accept_raw(stream: trio.SocketStream) -> RawPeer:
    """The server side of a handshake, accepted with wsproto."""
    peer = RawPeer(stream, wsproto.ConnectionType.SERVER)
    request = await peer.next_event()
    assert isinstance(request, Request), request
    await peer.send(AcceptConnection(subprotocol=request.subprotocols[0] if request.subprotocols else None))
    return peer


@asynccontextmanager
async def ws_client(
    port: int,
    resource: str = "/",
    *,
    subprotocols: list[str] | tuple[str, ...] = (),
    headers: list[tuple[bytes, bytes]] | None = None,
    max_message_size: int = 1 << 20,
    message_queue_size: int = 1,
) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client whose socket is always closed afterwards: ``open_websocket_url``
    leaks it when the server closes first (its reader stops at EOF without closing the stream)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        async with trio.open_nursery() as nursery:
            try:
                ws = await wrap_client_stream(
                    nursery,
                    stream,
                    f"127.0.0.1:{port}",
                    resource,
                    subprotocols=list(subprotocols),
                    extra_headers=headers or [],
                    max_message_size=max_message_size,
                    message_queue_size=message_queue_size,
                )
                try:
                    yield ws
                finally:
                    with trio.move_on_after(1.0):
                        await ws.aclose()
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # a refusal is raised in the reader task
        rejected, _ = group.split(ConnectionRejected)
        if rejected is not None:
            first = rejected.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        raise
    finally:
        await trio.aclose_forcefully(stream)


# --- the harness: h11 parses the head, the shell takes over ------------------------------------------


def plan_for(
    url: str, *, key: str = UPSTREAM_KEY, subprotocols: tuple[str, ...] | None = None, allow_private: bool = True
) -> SessionPlan:
    """A plan as the gateway makes it; ``subprotocols=None``: the client's, minus key-carrying ones."""
    return SessionPlan(
        target=upstream_target(url),
        headers=[(b"authorization", f"Bearer {key}".encode())],
        subprotocols=subprotocols,  # type: ignore[arg-type]  # filled in per connection when None
        address_policy=AddressPolicy(allow_private=allow_private),
        response_headers=[(b"x-request-id", b"test")],
    )


@dataclass
class Finished:
    report: SessionReport
    error: ParkwayError | None = None


class SessionHarness:
    """Each connection: the head parsed with h11, then ``proxy.run`` with ``plan``; a refusal
    before the upgrade is answered as JSON, as the gateway does."""

    def __init__(self, proxy: WebSocketProxy, plan: SessionPlan):
        self.proxy = proxy
        self.plan = plan
        self.finished: list[Finished] = []
        self.port = 0
        self._done = trio.Event()
        self.scope = trio.CancelScope()  # cancelling it is a server shutdown

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        with self.scope:
            task_status.started(self)
            await trio.serve_listeners(self._connection, listeners)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/?X-Sw-Credential=test"

    async def wait_finished(self, count: int = 1) -> list[Finished]:
        while len(self.finished) < count:
            await self._done.wait()
        return self.finished

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        head: h11.Request | None = None
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(ev, h11.Request):
                head = ev
            elif ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                break
        assert head is not None
        handshake = handshake_request(head.target.decode("latin-1"), head.headers) + conn.trailing_data[0]
        offered = b", ".join(v for n, v in head.headers if n == b"sec-websocket-protocol").decode()
        plan = self.plan
        if plan.subprotocols is None:  # the client's, as the gateway offers them
            plan = replace(plan, subprotocols=split_subprotocols(parse_subprotocols(offered))[0])
        report = SessionReport()
        finished = Finished(report)
        try:
            await self.proxy.run(plan, lambda: (stream, handshake), report)
        except ParkwayError as exc:
            finished.error = exc
            status, headers, body = error_response(exc)
            await stream.send_all(
                conn.send(h11.Response(status_code=status, headers=headers))
                + conn.send(h11.Data(data=body))
                + conn.send(h11.EndOfMessage())
            )
        finally:
            self.finished.append(finished)
            self._done.set()
            self._done = trio.Event()
            await trio.aclose_forcefully(stream)


def proxy_with(ssl_context: ssl.SSLContext | None = None, **settings: Any) -> WebSocketProxy:
    return WebSocketProxy(WebSocketConfig(**settings), ssl_context=ssl_context)


def self_signed(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it) for ``localhost`` and 127.0.0.1, made with
    the openssl command (a throwaway EC key; nothing leaves the test's directory)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client
