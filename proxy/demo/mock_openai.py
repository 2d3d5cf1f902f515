"""A small OpenAI-style upstream for the demo, the tests and the load tests. Loopback only.

It runs on Parkway's own HTTP server module and answers:

* ``POST /v1/chat/completions``: a completion of at most ``max_tokens`` (or
  ``max_completion_tokens``) words, one token each, with its ``usage``; with ``"stream": true`` it is sent as SSE
  chunks word by word, ``delay`` seconds apart (``data: [DONE]`` last, and a ``usage``
  chunk first when ``stream_options.include_usage`` is set, as OpenAI does);
* ``GET /v1/models``: a model list.

It insists on ``Authorization: Bearer <api_key>`` when given one, which is how the demo shows
that the key is injected by Parkway and never known to the browser.
"""

from __future__ import annotations

import json
import time

import trio

from ..config import ServerConfig
from ..errors import ParkwayError
from ..http.connection import HTTPConnection, RequestHead
from ..http.server import Server, bound_address, open_listeners

DEMO_TEXT = (
    "Parkway verified the signed URL, added the API key the browser never saw, and is relaying "
    "this answer to you one event at a time, exactly as the upstream sent it."
)


def _json(status: int, payload: dict) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(payload).encode()
    return status, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> bytes:
    payload = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class MockOpenAI:
    """The application object for :class:`~proxy.http.server.Server`."""

    def __init__(
        self, *, api_key: str | None = None, delay: float = 0.05, text: str = DEMO_TEXT, created: int | None = None
    ):
        self.api_key = api_key
        self.delay = delay
        self.text = text
        self.created = created  # a fixed "created", so that answers can be compared byte for byte
        self.requests: list[tuple[RequestHead, bytes]] = []

    async def reject(self, head: RequestHead | None, conn: HTTPConnection, exc: ParkwayError) -> None:
        await conn.send_full(*_json(exc.status, {"error": {"message": exc.message}}))

    async def handle(self, head: RequestHead, conn: HTTPConnection) -> None:
        body = await conn.read_body(1 << 20)
        self.requests.append((head, body))
        if self.api_key is not None and head.header(b"authorization") != f"Bearer {self.api_key}":
            await conn.send_full(
                *_json(
                    401,
                    {
                        "error": {
                            "type": "invalid_request_error",
                            "code": "invalid_api_key",
                            "message": "missing or wrong API key",
                        }
                    },
                )
            )
            return
        if head.method == "GET" and head.path == "/v1/models":
            await conn.send_full(*_json(200, {"object": "list", "data": [{"id": "mock-gpt", "object": "model"}]}))
            return
        if head.method != "POST" or head.path != "/v1/chat/completions":
            await conn.send_full(*_json(404, {"error": {"message": f"no route {head.method} {head.path}"}}))
            return
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            await conn.send_full(*_json(400, {"error": {"message": "body is not JSON"}}))
            return
        await self._completion(conn, request)

    async def _completion(self, conn: HTTPConnection, request: dict) -> None:
        model = str(request.get("model", "mock-gpt"))
        words = self.text.split(" ")
        cap = request.get("max_completion_tokens", request.get("max_tokens"))
        if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0:
            words = words[:cap]  # one word is one token here, and the answer stops at the cap, as OpenAI's does
        created = self.created if self.created is not None else int(time.time())
        cid = "chatcmpl-mock"
        usage = {"prompt_tokens": 9, "completion_tokens": len(words), "total_tokens": 9 + len(words)}
        if not request.get("stream"):
            await conn.send_full(
                *_json(
                    200,
                    {
                        "id": cid,
                        "object": "chat.completion",
                        "created": created,
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": self.text},
                            }
                        ],
                        "usage": usage,
                    },
                )
            )
            return
        await conn.send_head(200, [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")])
        await conn.send_data(_chunk(cid, created, model, {"role": "assistant", "content": ""}))
        for i, word in enumerate(words):
            await trio.sleep(self.delay)
            await conn.send_data(_chunk(cid, created, model, {"content": word if i == 0 else " " + word}))
        await conn.send_data(_chunk(cid, created, model, {}, "stop"))
        if (request.get("stream_options") or {}).get("include_usage"):
            payload = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            await conn.send_data(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")
        await conn.send_data(b"data: [DONE]\n\n")
        await conn.send_end()


async def serve_mock(
    app: MockOpenAI,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on loopback; ``task_status.started`` gets its base URL."""
    config = ServerConfig(listen=(f"{host}:{port}",), drain_timeout=1.0)
    listeners = await open_listeners(config.listen)
    server = Server(config, app)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        task_status.started(f"http://{bound_address(listeners[0])}")
