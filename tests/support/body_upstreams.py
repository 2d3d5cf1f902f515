"""Upstreams that watch a request body as it arrives, where ``support.upstream.Upstream``
records complete requests only: :class:`BodySink` also shows a body cut short, and
:class:`BodyProbe` lets a test wait until some of a body is in, to prove it is streamed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import h11
import trio

from support.loopback import LoopbackServer


class BodySink(LoopbackServer):
    """An HTTP/1.1 upstream that records, per connection, the request body bytes that arrived
    and whether the request was complete (it answers 200 only to a complete one)."""

    def __init__(self) -> None:
        self.connections = 0
        self.bodies: list[bytes] = []  # one per ended connection: the body bytes received
        self.complete: list[bytes] = []  # bodies of requests that arrived whole
        self.ended = trio.Event()  # set each time a connection has ended (then replaced)

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


@dataclass
class BodyProbe(LoopbackServer):
    """An HTTP/1.1 upstream (raw h11) that counts request-body bytes as they arrive.

    ``wait_received(n)`` returns once ``n`` bytes of the current body are in, so a test can
    prove the body is streamed (not spooled whole by nginx) by holding the rest back. It
    answers 200 with ``{"length", "sha256", "chunked"}`` once the body is complete.
    """

    port: int = 0
    received: int = 0
    requests: list[dict] = field(default_factory=list)
    _progress: trio.Event = field(default_factory=trio.Event)

    async def wait_received(self, count: int) -> None:
        while self.received < count:
            await self._progress.wait()

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        digest = hashlib.sha256()
        head: h11.Request | None = None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    head, self.received = event, 0
                elif isinstance(event, h11.Data):
                    digest.update(event.data)
                    self.received += len(event.data)
                    self._progress.set()
                    self._progress = trio.Event()
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    headers = {n.decode(): v.decode() for n, v in head.headers}
                    summary = {
                        "length": self.received,
                        "sha256": digest.hexdigest(),
                        "chunked": headers.get("transfer-encoding") == "chunked",
                    }
                    self.requests.append({"target": head.target.decode(), "headers": headers, **summary})
                    body = json.dumps(summary).encode()
                    response = h11.Response(
                        status_code=200,
                        headers=[
                            ("content-type", "application/json"),
                            ("content-length", str(len(body))),
                            ("connection", "close"),
                        ],
                    )
                    await stream.send_all(
                        conn.send(response) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
                    )
                    return
                else:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)
