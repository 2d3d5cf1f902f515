"""A mock of OpenAI's Realtime API (WebSocket) for the demo and the browser example; no network.

It refuses a handshake without the expected ``Authorization: Bearer <key>`` (401), picks the
``realtime`` subprotocol when offered, sends ``session.created``, answers ``response.create``
with text deltas of a canned answer (``delay`` seconds apart) and a ``response.done`` carrying
usage, and echoes anything else: binary messages as binary, text as text.
"""

from __future__ import annotations

import json

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

ANSWER = "Parkway relays realtime events both ways, and the key never leaves it."


def _event(kind: str, **fields: object) -> str:
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


class MockRealtime:
    def __init__(self, *, api_key: str, delay: float = 0.05):
        self.api_key = api_key
        self.delay = delay
        self.port = 0

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[MockRealtime] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, self._handle, host, port, None)
            self.port = server.port
            task_status.started(self)

    async def _handle(self, request: WebSocketRequest) -> None:
        headers = {name.lower(): value for name, value in request.headers}
        if headers.get(b"authorization") != f"Bearer {self.api_key}".encode():
            await request.reject(401, body=_event("error", error={"message": "missing or wrong API key"}).encode())
            return
        offered = request.proposed_subprotocols
        ws = await request.accept(subprotocol="realtime" if "realtime" in offered else None)
        try:
            await ws.send_message(_event("session.created", session={"id": "sess_mock", "model": "mock-realtime"}))
            while True:
                message = await ws.get_message()
                if isinstance(message, str) and '"response.create"' in message[:64]:
                    await self._respond(ws)
                else:
                    await ws.send_message(message)
        except ConnectionClosed:
            pass

    async def _respond(self, ws: WebSocketConnection) -> None:
        words = ANSWER.split(" ")
        for i, word in enumerate(words):
            await ws.send_message(_event("response.output_text.delta", delta=word if i == 0 else " " + word))
            await trio.sleep(self.delay)
        usage = {"total_tokens": 12 + len(words), "input_tokens": 12, "output_tokens": len(words)}
        await ws.send_message(
            _event("response.done", response={"id": "resp_mock", "status": "completed", "usage": usage})
        )
