"""The one way the test upstreams listen (a free port on 127.0.0.1, one task per connection), and
the one head reader of those that parse HTTP/1.1 by hand."""

from __future__ import annotations

from typing import Any

import trio


class LoopbackServer:
    """Base of the test upstreams: ``await nursery.start(server.serve)`` returns the server once it
    listens (``port`` set); each accepted connection goes to ``_connection``, which subclasses write."""

    port: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    async def _connection(self, stream: Any) -> None:
        raise NotImplementedError


async def receive_head(stream: Any, buffer: bytes) -> tuple[bytes, bytes] | None:
    """Read until a request head is in: (head without its blank line, bytes after it), or None at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest
