"""A stand-in for your web backend (the Rails app) in the browser example, on Trio.

    .venv/bin/python examples/browser/backend.py          # then open the printed URL

It starts three things on loopback, as ``parkway demo`` does:

* this backend: serves ``index.html`` and ``app.js`` and answers ``POST /sign`` with
  ``{"url", "headers"}``, a URL signed with ``proxy.signing.sign_url`` for exactly the body
  it was given (in Rails this is a controller action using clients/ruby/parkway_signer.rb);
  ``realtime.html`` is a realtime page, whose ``POST /sign-realtime`` gets a URL for a WebSocket;
* Parkway, holding the (mock) API key and allowing this page's origin (CORS);
* a mock OpenAI upstream (``proxy.demo.mock_openai.MockOpenAI``), unless ``upstream_url`` is given,
  and a mock Realtime API (``proxy.demo.mock_realtime.MockRealtime``), unless ``realtime_url`` is.

The backend knows only the signing secret; the API key lives in Parkway alone.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import trio

from proxy.app import Parkway
from proxy.cache.policy import CacheRules
from proxy.config import Config, CorsConfig, Credential, ServerConfig
from proxy.demo.mock_openai import MockOpenAI
from proxy.demo.mock_realtime import MockRealtime
from proxy.errors import ParkwayError
from proxy.gateway.handler import utcnow
from proxy.http.connection import HTTPConnection, RequestHead
from proxy.http.server import Server, bound_address, open_listeners
from proxy.signing import sign_url

HERE = Path(__file__).resolve().parent
STATIC = {
    "/": ("index.html", b"text/html; charset=utf-8"),
    "/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    "/realtime.html": ("realtime.html", b"text/html; charset=utf-8"),
    "/realtime.js": ("realtime.js", b"text/javascript; charset=utf-8"),
}
CREDENTIAL_ID = "browser-example"
MAX_SIGNED_BODY = 64 * 1024
URL_LIFETIME = 60  # seconds: the browser uses the URL at once


def _response(status: int, content_type: bytes, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    return status, headers, body


def _json(status: int, payload: dict) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return _response(status, b"application/json", json.dumps(payload).encode())


@dataclass
class Backend:
    """The application object for :class:`proxy.http.server.Server`: static files and /sign."""

    secret: str
    parkway_base: str = ""  # set once Parkway listens
    upstream_base: str = ""
    cache_ttl: int = 0  # > 0: sign with pw_cache, so Parkway may answer a repeated call from its cache
    realtime_base: str = ""  # ws://host:port of the realtime API

    async def reject(self, head: RequestHead | None, conn: HTTPConnection, exc: ParkwayError) -> None:
        await conn.send_full(*_json(exc.status, {"error": exc.message}))

    async def handle(self, head: RequestHead, conn: HTTPConnection) -> None:
        if head.method == "GET" and head.path in STATIC:
            name, content_type = STATIC[head.path]
            await conn.send_full(*_response(200, content_type, (HERE / name).read_bytes()))
        elif head.method == "POST" and head.path == "/sign":
            try:
                body = await conn.read_body(MAX_SIGNED_BODY)
            except ParkwayError as exc:
                await conn.send_full(*_json(exc.status, {"error": exc.message}))
                return
            await conn.send_full(*self.sign(body))
        elif head.method == "POST" and head.path == "/sign-realtime":
            await self._drain(conn)
            await conn.send_full(*self.sign_realtime())
        else:
            await conn.send_full(*_json(404, {"error": f"no route {head.method} {head.path}"}))

    @staticmethod
    async def _drain(conn: HTTPConnection) -> None:
        async for _ in conn.body_chunks():
            pass

    def sign_realtime(self) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """A GET signed for the realtime WebSocket: the page opens it, Parkway adds the key.
        A real backend would also sign ``pw_user`` (limits per user) and ``pw_single_use``."""
        url = sign_url(
            id=CREDENTIAL_ID,
            secret=self.secret,
            host=self.parkway_base,
            proxy_url=f"{self.realtime_base}/v1/realtime?model=gpt-realtime",
            expiry=URL_LIFETIME,
            method="GET",
            params={"pw_single_use": "1"},  # one session per URL
        )
        return _json(200, {"url": url})

    def sign(self, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Sign exactly ``body`` for Parkway. A real backend first checks who is asking, rate
        limits them, and validates (or rewrites, then returns) the request: model, max_tokens."""
        try:
            text = body.decode("utf-8")
            request = json.loads(text)
        except ValueError:
            return _json(400, {"error": "the body must be JSON"})
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            return _json(400, {"error": "expected a chat completion request with messages"})
        headers = {"Content-Type": "application/json"}
        url = sign_url(
            id=CREDENTIAL_ID,
            secret=self.secret,
            host=self.parkway_base,
            proxy_url=f"{self.upstream_base}/v1/chat/completions",
            expiry=URL_LIFETIME,
            method="POST",
            headers=headers,  # the browser must send this Content-Type ...
            body=text,  # ... and exactly this body
            # A deterministic call may be answered from Parkway's cache for cache_ttl seconds.
            params={"pw_cache": str(self.cache_ttl)} if self.cache_ttl else None,
        )
        return _json(200, {"url": url, "headers": headers})


@dataclass
class Example:
    """What is running; :meth:`stop` drains every server (no cancellation, nothing leaks)."""

    page_url: str
    parkway_url: str
    upstream_url: str
    realtime_url: str = ""
    servers: list[Server | Parkway] = field(default_factory=list)
    mocks: list[trio.CancelScope] = field(default_factory=list)  # the realtime mock: cancelled
    stopped: trio.Event = field(default_factory=trio.Event)

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
        for scope in self.mocks:
            scope.cancel()


async def serve_example(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    parkway_port: int = 0,
    upstream_url: str | None = None,
    realtime_url: str | None = None,
    api_key: str | None = None,
    delay: float = 0.08,
    parkway_clock: Callable[[], datetime] = utcnow,
    cache_ttl: int = 0,
    cache_replay: str = "instant",
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the backend, Parkway and (unless ``upstream_url``) the mock upstream until stopped.

    ``task_status.started`` gets the :class:`Example`; it returns once ``stop()`` has drained all.
    """
    quick = dict(drain_timeout=1.0, keepalive_timeout=5.0)
    backend = Backend(secret=secrets.token_urlsafe(24), cache_ttl=cache_ttl)
    api_key = api_key or "sk-example-" + secrets.token_hex(8)
    example: Example | None = None
    mocks: list[trio.CancelScope] = []
    try:
        async with trio.open_nursery() as nursery:
            page_listeners = await open_listeners((f"{host}:{port}",))
            page_server = Server(ServerConfig(listen=(f"{host}:{port}",), **quick), backend)
            await nursery.start(page_server.serve, page_listeners)
            page_url = f"http://{bound_address(page_listeners[0])}"
            servers: list[Server | Parkway] = [page_server]

            if upstream_url is None:
                mock_listeners = await open_listeners((f"{host}:0",))
                mock_server = Server(
                    ServerConfig(listen=(f"{host}:0",), **quick), MockOpenAI(api_key=api_key, delay=delay)
                )
                await nursery.start(mock_server.serve, mock_listeners)
                upstream_url = f"http://{bound_address(mock_listeners[0])}"
                servers.append(mock_server)
            if realtime_url is None:
                scope = trio.CancelScope()
                mocks.append(scope)

                async def run_mock(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
                    with scope:
                        await MockRealtime(api_key=api_key, delay=delay).serve(host, task_status=task_status)

                mock = await nursery.start(run_mock)
                realtime_url = f"ws://{host}:{mock.port}"

            config = Config(
                server=ServerConfig(listen=(f"{host}:{parkway_port}",), **quick),
                credentials=(
                    Credential(
                        id=CREDENTIAL_ID,
                        secrets=(backend.secret,),
                        headers=(("Authorization", f"Bearer {api_key}"),),
                        allowed_upstreams=(upstream_url + "/v1/", realtime_url + "/v1/realtime"),
                        cache=CacheRules(replay=cache_replay),
                    ),
                ),
                # Only this page may call Parkway from a browser; it may read X-Request-Id.
                cors=CorsConfig(allow_origins=(page_url,), expose_headers=("x-request-id",)),
            )
            parkway = Parkway(config, clock=parkway_clock)
            addresses = await nursery.start(parkway.run)
            servers.append(parkway)
            backend.parkway_base = f"http://{addresses[0]}"
            backend.upstream_base = upstream_url
            backend.realtime_base = realtime_url
            example = Example(page_url + "/", backend.parkway_base, upstream_url, realtime_url, servers, mocks)
            task_status.started(example)
    finally:
        if example is not None:
            example.stopped.set()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="the page's port (default 8000)")
    parser.add_argument("--parkway-port", type=int, default=3000, help="Parkway's port (default 3000)")
    parser.add_argument("--delay", type=float, default=0.08, help="seconds between mock tokens")
    args = parser.parse_args()
    async with trio.open_nursery() as nursery:
        example: Example = await nursery.start(
            partial(serve_example, port=args.port, parkway_port=args.parkway_port, delay=args.delay)
        )
        print(f"page      {example.page_url}   <- open this in a browser", flush=True)
        print(f"parkway   {example.parkway_url}", flush=True)
        print(f"upstream  {example.upstream_url}   (mock OpenAI)", flush=True)
        print(f"realtime  {example.page_url}realtime.html   <- a realtime session over a WebSocket", flush=True)
        print("Ctrl-C stops", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                print("stopping", flush=True)
                example.stop()
                break


if __name__ == "__main__":
    trio.run(main)
