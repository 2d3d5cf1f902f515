"""The only module that runs WebSockets: one proxied session, trio-websocket on both sides.

After the gateway has verified and admitted the handshake, :meth:`WebSocketProxy.run`:
1. connects to the upstream through the SSRF guard and does its handshake (the credential's
   headers, the client's key-free subprotocols); a failure here is a ParkwayError, answered
   by the gateway as JSON while the client still waits for HTTP;
2. only then takes the client connection over from the HTTP server (the parsed head and any
   bytes after it replayed to trio-websocket) and accepts it with the upstream's subprotocol;
3. relays both ways at once with bounded queues, until a side closes, a message is too big,
   or the idle or maximum-duration deadline passes; 4. closes the other side as
   :func:`~proxy.websocket.policy.decide_close` says. The :class:`SessionReport` tells what happened.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import h11
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    WebSocketRequest,
)
from wsproto import ConnectionType, WSConnection
from wsproto.events import BytesMessage, CloseConnection, TextMessage
from wsproto.utilities import ProtocolError as WSProtocolError

from ..errors import ParkwayError, UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeout
from ..relay.usage import Usage
from ..upstream.connection import UpstreamConnection
from ..upstream.dns import DNSCache
from ..upstream.ssrf import AddressPolicy, Resolver, resolve
from . import policy as ws_policy
from .policy import CLIENT, UPSTREAM, Ending, UpstreamTarget, WebSocketConfig

Headers = list[tuple[bytes, bytes]]

RECEIVE_SIZE = 65536  # per read from either socket (trio-websocket's default of 4 KiB costs 16x the reads)


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """What the gateway decided about one session before it is opened."""

    target: UpstreamTarget
    headers: Headers  # extra upstream handshake headers (the credential's injected ones ...)
    subprotocols: tuple[str, ...]  # offered upstream: the client's, minus key-carrying ones
    address_policy: AddressPolicy  # where the upstream connection may go (SSRF guard)
    response_headers: Headers = field(default_factory=list)  # added to the client's 101
    # Told the session's usage after each response.done; a reason it returns ends the session
    # with 1008 (a budget that has no more room for it: gateway.budget).
    usage_cap: Callable[[Usage], str | None] | None = None


@dataclass(slots=True)
class Traffic:
    messages: int = 0
    bytes: int = 0  # payload bytes of whole messages
    peak_buffered: int = 0  # most bytes of one unfinished message held at once (<= max_message_size)


class _BoundedConnection(WebSocketConnection):
    """trio-websocket's connection with Parkway's message bounds enforced as frames arrive.

    trio-websocket counts a text message in characters and keeps every fragment as its own
    object until the message ends, so an empty continuation frame costs memory and time yet
    counts for nothing. Here each frame is checked against a :class:`~proxy.websocket.policy.MessageBudget`
    (UTF-8 bytes, frames per message) *before* it is kept, the fragments of one message go
    into one buffer, and past a bound the peer is closed with 1009 saying which bound.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws_connection: WSConnection,
        *,
        settings: WebSocketConfig,
        host: str | None = None,
        path: str | None = None,
        client_subprotocols: tuple[str, ...] = (),
        client_extra_headers: Headers | None = None,
    ):
        super().__init__(
            stream,
            ws_connection,
            host=host,
            path=path,
            client_subprotocols=client_subprotocols,
            client_extra_headers=client_extra_headers,
            message_queue_size=settings.message_queue_size,
            max_message_size=settings.max_message_size,
            receive_buffer_size=RECEIVE_SIZE,
        )
        self.budget = ws_policy.MessageBudget(settings.max_message_size, settings.max_message_frames)
        self.overflow: str | None = None  # why Parkway closed this side with 1009
        self._buffer = bytearray()  # an unfinished message's payload so far

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:
        data: str | bytes = bytes(event.data) if isinstance(event.data, bytearray) else event.data
        refused = self.budget.add(ws_policy.message_size(data), frame_finished=event.frame_finished)
        if refused is not None:
            self.overflow = refused
            self._buffer = bytearray()
            self.budget.reset()
            self._close_reason = CloseReason(ws_policy.MESSAGE_TOO_BIG, refused)
            await self._send(CloseConnection(code=ws_policy.MESSAGE_TOO_BIG, reason=refused))
            await self._recv_channel.aclose()
            # Stops the reader before the frames still parsed from the same read are looked at.
            raise ConnectionClosed(self._close_reason)
        if not event.message_finished:
            # One buffer of the payload's bytes (text as UTF-8), not one object per fragment.
            self._buffer += data.encode() if isinstance(data, str) else data
            return
        message: str | bytes = data  # unfragmented: passed on as wsproto made it, no copy
        if self._buffer:
            self._buffer += data.encode() if isinstance(data, str) else data
            # wsproto has checked the UTF-8 fragment by fragment.
            message = self._buffer.decode() if isinstance(data, str) else bytes(self._buffer)
        self._buffer = bytearray()
        self.budget.reset()
        try:
            await self._send_channel.send(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the receiving side closed: nothing to hand over (as trio-websocket does)


async def _wrap_client(
    nursery: trio.Nursery, stream: trio.abc.Stream, host: str, resource: str, *, subprotocols: tuple[str, ...],
    extra_headers: Headers, settings: WebSocketConfig,
) -> _BoundedConnection:  # fmt: skip
    """trio-websocket's ``wrap_client_stream`` with :class:`_BoundedConnection`."""
    connection = _BoundedConnection(
        stream, WSConnection(ConnectionType.CLIENT), settings=settings, host=host, path=resource,
        client_subprotocols=subprotocols, client_extra_headers=extra_headers,
    )  # fmt: skip
    nursery.start_soon(connection._reader_task)
    await connection._open_handshake.wait()
    return connection


async def _wrap_server(nursery: trio.Nursery, stream: trio.abc.Stream, settings: WebSocketConfig) -> WebSocketRequest:
    """trio-websocket's ``wrap_server_stream`` with :class:`_BoundedConnection`."""
    connection = _BoundedConnection(stream, WSConnection(ConnectionType.SERVER), settings=settings)
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()


@dataclass(slots=True)
class SessionReport:
    """Filled in as the session goes, so a failure still leaves what happened so far."""

    accepted: bool = False  # the client got its 101
    opened_at: float = 0.0  # trio time of the 101
    subprotocol: str | None = None
    from_client: Traffic = field(default_factory=Traffic)
    from_upstream: Traffic = field(default_factory=Traffic)
    client_code: int | None = None  # close code of the client's leg, whoever sent it
    upstream_code: int | None = None
    closed_by: str | None = None  # client | upstream | parkway
    outcome: str | None = None  # see ws_policy's outcomes
    level: str = "info"
    usage: Usage | None = None
    responses_open: int = 0  # model responses begun and not done when the session ended
    duration: float = 0.0  # seconds from the 101 to the end of the close


class _HandoverStream(trio.abc.Stream):
    """A stream that first returns ``prefix`` (bytes already read by someone else), then reads on.

    While ``handshaking`` (the upstream side, until its 101 is accepted) an end of the stream,
    or trio-websocket closing it over an invalid answer, raises :class:`UpstreamProtocolError`
    from its reader task: otherwise the handshake would wait for an answer that never comes.
    """

    def __init__(self, inner: trio.abc.Stream, prefix: bytes = b"", peer: str | None = None):
        self.inner = inner
        self._prefix = memoryview(prefix) if prefix else None
        self._peer = peer
        self.handshaking = peer is not None
        self._answer_tail: bytes | None = b"" if peer is not None else None  # until the answer's head is in

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix is not None:
            size = len(self._prefix) if max_bytes is None else max_bytes
            head, rest = self._prefix[:size], self._prefix[size:]
            self._prefix = rest if len(rest) else None
            await trio.lowlevel.checkpoint()
            return bytes(head)
        try:
            data = bytes(await self.inner.receive_some(max_bytes))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self._answer_tail is not None:
                raise UpstreamProtocolError(
                    f"{self._peer} dropped the connection during the WebSocket handshake"
                ) from None
            raise
        if self._answer_tail is not None:
            # Once the whole answer head is in, an end of the stream is the session's to handle
            # (a 101 and a close can come in one read, before the handshake's waiter has run).
            if not data:
                raise UpstreamProtocolError(f"{self._peer} closed the connection during the WebSocket handshake")
            seen = self._answer_tail + data
            self._answer_tail = None if b"\r\n\r\n" in seen else seen[-3:]
        return data

    def handshake_over(self) -> None:
        """From now on the stream's end and errors are the session's (or our own doing)."""
        self.handshaking = False
        self._answer_tail = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()
        if self.handshaking:  # only trio-websocket closes it then: the answer was not a valid 101
            raise UpstreamProtocolError(f"{self._peer} sent an invalid WebSocket handshake answer")


def _ending(side: str, exc: ConnectionClosed, ws: WebSocketConnection) -> Ending:
    """How ``side`` ended: Parkway's own 1009 only when Parkway closed it (never read from the
    reason text, which a peer may send too: its 1009 is passed on as its own)."""
    overflow = getattr(ws, "overflow", None)
    if overflow is not None:
        return Ending(side, ws_policy.MESSAGE_TOO_BIG, overflow, overflow=True)
    reason = exc.reason
    if reason is None:
        return Ending(side)
    code = int(reason.code)  # wsproto's enum for known codes: a plain int in logs and decisions
    return Ending(side, code, reason.reason)


def _single(group: BaseExceptionGroup, host: str, answered: bool) -> BaseException:
    """The one error a session failed with, as the gateway expects it (not wrapped in a group).

    Before the client is ``answered``, the upstream's reader task can only fail over the
    handshake: a refusal, or an answer wsproto or h11 will not take.
    """
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
        leaf = leaf.exceptions[0]
    if isinstance(leaf, BaseExceptionGroup):
        return group
    if isinstance(leaf, ParkwayError):
        return leaf
    if answered:
        return group
    if isinstance(leaf, ConnectionRejected):
        # Only the status: an upstream's refusal body may quote part of the key.
        return UpstreamError(
            f"{host} refused the WebSocket handshake with HTTP {leaf.status_code}", code="upstream_websocket_refused"
        )
    if isinstance(leaf, (WSProtocolError, h11.ProtocolError)):
        return UpstreamProtocolError(f"{host} sent an invalid WebSocket handshake answer: {leaf}")
    return group


class WebSocketProxy:
    """Runs sessions with one :class:`~proxy.websocket.policy.WebSocketConfig` (``settings`` may be swapped live)."""

    def __init__(
        self,
        settings: WebSocketConfig,
        *,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None,
        resolver: Resolver = resolve,
    ):
        self.settings = settings
        # A context, or what gives it on first use: loading the system's certificates takes tens
        # of milliseconds, which every start (and every Gateway) paid for a wss:// upstream seldom used.
        self._ssl_context = ssl_context or ssl.create_default_context
        self._resolve = resolver
        self.active = 0  # sessions past their 101

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if not isinstance(self._ssl_context, ssl.SSLContext):
            self._ssl_context = self._ssl_context()
        return self._ssl_context

    @ssl_context.setter
    def ssl_context(self, context: ssl.SSLContext) -> None:
        self._ssl_context = context

    async def run(
        self, plan: SessionPlan, hand_over: Callable[[], tuple[trio.abc.Stream, bytes]], report: SessionReport
    ) -> None:
        """Open, relay and close one session; ``hand_over()`` gives the client's stream and the
        handshake bytes to replay, and is called only once the upstream has accepted.

        Raises a :class:`~proxy.errors.ParkwayError` only before the client is answered.
        """
        settings = self.settings
        try:
            async with trio.open_nursery() as nursery:  # the readers of both connections
                try:
                    with trio.fail_after(settings.handshake_timeout):
                        upstream, upstream_stream = await self._open_upstream(nursery, plan, settings)
                    await self._serve(nursery, upstream, upstream_stream, hand_over, plan, settings, report)
                except trio.TooSlowError:
                    raise UpstreamTimeout(
                        f"{plan.target.host_header} did not complete the WebSocket handshake "
                        f"within {settings.handshake_timeout:g} s"
                    ) from None
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _single(group, plan.target.host_header, report.accepted) from None

    # --- step 1: the upstream ---------------------------------------------------------------

    async def _connect(self, target: UpstreamTarget, policy: AddressPolicy) -> trio.abc.Stream:
        """TCP through the SSRF guard that proxied requests use (the name resolved once, every
        address checked, a checked address connected), then TLS against the name."""
        try:
            conn = await UpstreamConnection.connect(
                target.host, target.port, policy=policy, ssl_context=None, timeout=math.inf, resolver=self._resolve
            )
        except (UpstreamConnectError, trio.Cancelled):  # refused, or handshake_timeout ran out while connecting
            if isinstance(self._resolve, DNSCache):
                self._resolve.forget(target.host, target.port)  # no kept address took it: ask the resolver next time
            raise
        stream: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn.sock))
        if target.tls:
            tls = trio.SSLStream(stream, self.ssl_context, server_hostname=target.host, https_compatible=True)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                await trio.aclose_forcefully(stream)
                raise UpstreamConnectError(f"TLS with {target.host_header} failed: {exc.__cause__ or exc}") from None
            stream = tls
        return stream

    async def _open_upstream(
        self, nursery: trio.Nursery, plan: SessionPlan, settings: WebSocketConfig
    ) -> tuple[WebSocketConnection, trio.abc.Stream]:
        target = plan.target
        raw = await self._connect(target, plan.address_policy)
        stream = _HandoverStream(raw, peer=target.host_header)
        try:
            upstream = await _wrap_client(
                nursery,
                stream,
                target.host_header,
                target.resource,
                subprotocols=plan.subprotocols,
                extra_headers=plan.headers,
                settings=settings,
            )
        except BaseException:
            stream.handshake_over()  # what follows is our doing, not the upstream's
            await trio.aclose_forcefully(raw)
            raise
        stream.handshake_over()
        return upstream, raw

    # --- steps 2-4: the client, the relay, the close ----------------------------------------

    async def _serve(
        self,
        nursery: trio.Nursery,
        upstream: WebSocketConnection,
        upstream_stream: trio.abc.Stream,
        hand_over: Callable[[], tuple[trio.abc.Stream, bytes]],
        plan: SessionPlan,
        settings: WebSocketConfig,
        report: SessionReport,
    ) -> None:
        client_stream: trio.abc.Stream | None = None
        try:
            raw, handshake = hand_over()
            client_stream = _HandoverStream(raw, handshake)
            report.subprotocol = upstream.subprotocol
            try:
                request = await _wrap_server(nursery, client_stream, settings)
                # The upstream chose among what the client offered (wsproto checks), so this is its choice.
                chosen = upstream.subprotocol if upstream.subprotocol in request.proposed_subprotocols else None
                client = await request.accept(subprotocol=chosen, extra_headers=plan.response_headers)
            except ConnectionClosed:
                report.outcome, report.closed_by = ws_policy.CLIENT_GONE, CLIENT
                report.upstream_code = ws_policy.GOING_AWAY
                await self._close(upstream, ws_policy.GOING_AWAY, "client went away", settings.close_timeout)
                return
            report.accepted, report.opened_at = True, trio.current_time()
            self.active += 1
            try:
                await self._relay_and_close(client, upstream, settings, report, plan.usage_cap)
            finally:
                self.active -= 1
                report.duration = trio.current_time() - report.opened_at
        finally:
            # Both sockets go now, whatever state the close handshakes reached (never waited for here).
            with trio.CancelScope(shield=True):
                if client_stream is not None:
                    await trio.aclose_forcefully(client_stream)
                await trio.aclose_forcefully(upstream_stream)

    async def _relay_and_close(
        self,
        client: WebSocketConnection,
        upstream: WebSocketConnection,
        settings: WebSocketConfig,
        report: SessionReport,
        usage_cap: Callable[[Usage], str | None] | None = None,
    ) -> None:
        usage = ws_policy.RealtimeUsage()
        ending: Ending | None = None
        try:
            ending = await self._relay(client, upstream, settings, report, usage, usage_cap)
        finally:
            report.usage, report.responses_open = usage.usage, usage.open
            for ws, traffic in ((client, report.from_client), (upstream, report.from_upstream)):
                if isinstance(ws, _BoundedConnection):
                    traffic.peak_buffered = ws.budget.peak
            if ending is None:  # cancelled from outside: the drain deadline, or a bug
                ending = Ending(why=ws_policy.CANCELLED)
                with trio.CancelScope(shield=True):
                    await self._finish(client, upstream, ending, settings, report, min(settings.close_timeout, 1.0))
        if report.outcome is None:
            await self._finish(client, upstream, ending, settings, report, settings.close_timeout)

    async def _finish(
        self,
        client: WebSocketConnection,
        upstream: WebSocketConnection,
        ending: Ending,
        settings: WebSocketConfig,
        report: SessionReport,
        timeout: float,
    ) -> None:
        closing = ws_policy.decide_close(
            ending,
            idle_timeout=settings.idle_timeout,
            max_duration=settings.max_session_duration,
            max_message_size=settings.max_message_size,
        )
        report.outcome, report.closed_by, report.level = closing.outcome, closing.closed_by, closing.level
        report.client_code = closing.to_client[0] if closing.to_client else ending.code
        report.upstream_code = closing.to_upstream[0] if closing.to_upstream else ending.code
        async with trio.open_nursery() as closers:
            if closing.to_client is not None:
                closers.start_soon(self._close, client, *closing.to_client, timeout)
            if closing.to_upstream is not None:
                closers.start_soon(self._close, upstream, *closing.to_upstream, timeout)

    @staticmethod
    async def _close(ws: WebSocketConnection, code: int, reason: str | None, timeout: float) -> None:
        """Send our close frame and wait (bounded) for the peer's; the stream is closed after."""
        with trio.move_on_after(timeout):
            await ws.aclose(code, reason)

    async def _relay(
        self,
        client: WebSocketConnection,
        upstream: WebSocketConnection,
        settings: WebSocketConfig,
        report: SessionReport,
        usage: ws_policy.RealtimeUsage,
        usage_cap: Callable[[Usage], str | None] | None = None,
    ) -> Ending:
        """Both directions at once until one ends; the idle deadline moves at most once per ``slack``."""
        ending: list[Ending] = []
        now = trio.current_time()
        idle_for = settings.idle_timeout or float("inf")
        slack = min(1.0, idle_for / 8)
        longest = now + settings.max_session_duration if settings.max_session_duration else float("inf")
        with trio.CancelScope(deadline=longest) as whole, trio.CancelScope(deadline=now + idle_for) as idle:
            async with trio.open_nursery() as pumps:

                def end(how: Ending) -> None:
                    if not ending:
                        ending.append(how)
                    pumps.cancel_scope.cancel()

                async def pump(
                    src: WebSocketConnection,
                    dst: WebSocketConnection,
                    src_side: str,
                    dst_side: str,
                    traffic: Traffic,
                    feed: Callable[[str], None] | None,
                ) -> None:
                    while True:
                        try:
                            message = await src.get_message()
                        except ConnectionClosed as exc:
                            return end(_ending(src_side, exc, src))
                        traffic.messages += 1
                        traffic.bytes += ws_policy.message_size(message)
                        try:
                            await dst.send_message(message)
                        except ConnectionClosed as exc:
                            return end(_ending(dst_side, exc, dst))
                        if feed is not None and type(message) is str:
                            feed(message)  # after the send: accounting never delays the client
                        moment = trio.current_time()
                        if moment + idle_for - idle.deadline > slack:
                            idle.deadline = moment + idle_for

                feed = usage.feed
                if usage_cap is not None:
                    cap = usage_cap

                    def feed(message: str) -> None:
                        done = usage.responses
                        usage.feed(message)
                        if usage.responses != done and usage.usage is not None:
                            reason = cap(usage.usage)
                            if reason is not None:
                                end(Ending(why=ws_policy.BUDGET_SPENT, reason=reason))

                pumps.start_soon(pump, client, upstream, CLIENT, UPSTREAM, report.from_client, None)
                pumps.start_soon(pump, upstream, client, UPSTREAM, CLIENT, report.from_upstream, feed)
        if ending:
            return ending[0]
        if idle.cancelled_caught:
            return Ending(why=ws_policy.IDLE)
        if whole.cancelled_caught:
            return Ending(why=ws_policy.MAX_DURATION)
        raise AssertionError("relay ended without a reason")  # pragma: no cover
