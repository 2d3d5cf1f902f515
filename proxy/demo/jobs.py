"""The background part of ``parkway demo``: the Sidekiq pattern without a worker.

A backend signs a URL with ``pw_callback``; Parkway answers ``202 Accepted`` at once, makes the
upstream call on its own and POSTs the result, signed as Standard Webhooks, to the callback:
here a small receiver standing in for the Rails app, which verifies the signature as
``clients/ruby/parkway_webhook.rb`` does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx2 as httpx
import trio

from ..config import ServerConfig
from ..errors import ParkwayError
from ..http.connection import HTTPConnection, RequestHead
from ..http.server import Server, bound_address, open_listeners
from ..jobs import webhooks

BACKGROUND_BODY = {"model": "mock-gpt", "messages": [{"role": "user", "content": "Summarise Parkway in one line."}]}


class DemoReceiver:
    """The app's webhook endpoint: verifies each delivery and remembers it."""

    def __init__(self, key: bytes):
        self.key = key
        self.deliveries: list[tuple[dict[str, str], dict]] = []
        self.arrived = trio.Event()

    async def reject(self, head: RequestHead | None, conn: HTTPConnection, exc: ParkwayError) -> None:
        await conn.send_full(exc.status, [(b"content-length", b"0")], b"")

    async def handle(self, head: RequestHead, conn: HTTPConnection) -> None:
        body = await conn.read_body(1 << 20)
        headers = {n.decode("latin-1"): v.decode("latin-1") for n, v in head.headers}
        try:
            webhooks.verify(body, headers, [self.key], now=time.time())
        except webhooks.WebhookVerificationError:
            await conn.send_full(400, [(b"content-length", b"0")], b"")
            return
        self.deliveries.append((headers, json.loads(body)))
        self.arrived.set()
        await conn.send_full(204, [], b"")


async def serve_receiver(app: DemoReceiver, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    config = ServerConfig(listen=("127.0.0.1:0",), drain_timeout=1.0)
    listeners = await open_listeners(config.listen)
    async with trio.open_nursery() as nursery:
        await nursery.start(Server(config, app).serve, listeners)
        task_status.started(f"http://{bound_address(listeners[0])}")


async def play_background(url: str, receiver: DemoReceiver, out: Callable[[str], None]) -> int:
    """POST the background URL as the backend would, then wait for the delivery; exit code."""
    started = trio.current_time()
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        response = await client.post(url, json=BACKGROUND_BODY)
    if response.status_code != 202:
        out(f"  unexpected status {response.status_code}: {response.text}")
        return 1
    accepted = response.json()
    out(f"  202 Accepted after {(trio.current_time() - started) * 1000:.0f} ms: {json.dumps(accepted)}")
    with trio.move_on_after(30):
        await receiver.arrived.wait()
    if not receiver.deliveries:
        out("  no webhook arrived within 30 s")
        return 1
    headers, payload = receiver.deliveries[0]
    answer = json.loads(payload["data"]["response"]["body"])["choices"][0]["message"]["content"]
    out(f"  webhook {headers['webhook-id']} arrived after {(trio.current_time() - started) * 1000:.0f} ms,"
        f" signature verified: {payload['type']}")  # fmt: skip
    out(f"  answer> {answer}")
    out(f"  and it can be read again at {accepted['status_url']}")
    return 0
