"""Parkway behind a real nginx configured with the shipped ``config/nginx/parkway.conf``.

Each test starts its own upstream, Parkway and nginx on loopback (nginx from the snippet
as shipped, only the upstream address filled in, in both prefix variants) and proves what
a browser behind nginx at ``/ai`` relies on: signatures for ``https://host/ai`` verify,
SSE events arrive one by one, refusals keep their JSON body and CORS headers, large bodies
stream, a browser that leaves stops the upstream, and X-Forwarded-For is believed only
from trusted proxies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import trio

from proxy.config import CorsConfig
from support.body_upstreams import BodyProbe
from support.http import request_bytes
from support.logs import watch_logs
from support.nginx import NGINX_SNIPPET, PROXY_PASS_AS_IS, render_nginx_conf, serve_nginx, snippet_sections
from support.parkway import RunningParkway
from support.processes import free_port
from support.signing import SIGNERS, UPSTREAM_KEY, sign
from support.upstream import Upstream, sse_from

ORIGIN = "https://app.example.com"
BODY = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
EVENTS = [f'data: {{"n":{i},"delta":"token {i}"}}\n\n'.encode() for i in range(1, 6)] + [b"data: [DONE]\n\n"]
WAIT = 5.0  # bound on every single wait below


# --- the stack: upstream <- Parkway <- nginx <- test client -------------------------------------


@dataclass
class Stack:
    parkway: RunningParkway
    nginx_port: int

    @property
    def public_base(self) -> str:
        """Where the browser reaches Parkway: nginx's /ai location (the signer's ``host``)."""
        return f"http://127.0.0.1:{self.nginx_port}/ai"


@pytest.fixture
def start_stack(nursery: trio.Nursery, tmp_path, start_parkway: Callable[..., Any]) -> Callable[..., Any]:
    """Factory: ``await start_stack(strip_prefix=..., cors=..., **parkway_server_overrides)``.

    Parkway comes from conftest's ``start_parkway`` (drained at teardown); nginx runs in the
    test's nursery and gets SIGTERM when the test ends.
    """

    async def start(*, strip_prefix: bool = False, **overrides: Any) -> Stack:
        running = await start_parkway(**overrides)
        port = free_port()
        conf = render_nginx_conf(
            tmp_path / "nginx", listen_port=port, parkway_address=running.addresses[0], strip_prefix=strip_prefix
        )
        await nursery.start(serve_nginx, tmp_path / "nginx", conf, port)
        return Stack(running, port)

    return start


class SSEReader:
    """Whole SSE events (``...\\n\\n``) from a streamed response, however nginx chunks them."""

    def __init__(self, response: httpx.Response):
        self._chunks = response.aiter_raw()
        self._buffer = b""

    async def __aenter__(self) -> SSEReader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._chunks.aclose()  # an unfinished generator must not be left to the GC

    async def next_event(self) -> bytes | None:
        while b"\n\n" not in self._buffer:
            try:
                self._buffer += await anext(self._chunks)
            except StopAsyncIteration:
                assert not self._buffer, f"stream ended inside an event: {self._buffer!r}"
                return None
        event, _, self._buffer = self._buffer.partition(b"\n\n")
        return event + b"\n\n"


MODES = {
    # The snippet as shipped: /ai is passed on, Parkway needs no configuration.
    "as-shipped": dict(strip_prefix=False),
    # proxy_pass with a trailing slash strips /ai; Parkway is told the prefix statically ...
    "stripped+public_path_prefix": dict(strip_prefix=True, public_path_prefix="/ai"),
    # ... or believes nginx's X-Forwarded-Prefix because nginx is a trusted proxy.
    "stripped+trusted_proxies": dict(strip_prefix=True, trusted_proxies=("127.0.0.1",)),
}


def test_snippet_has_what_streaming_needs() -> None:
    """The directives the README promises are in the shipped location, each with a comment."""
    location = snippet_sections()["server: location"]
    lines = location.splitlines()
    for directive in (
        "proxy_http_version 1.1;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_buffering off;",
        "proxy_request_buffering off;",
        "proxy_read_timeout",
        "proxy_send_timeout",
        "client_max_body_size",
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Prefix",
        "proxy_set_header Host",
        PROXY_PASS_AS_IS,
    ):
        index = next(
            (i for i, line in enumerate(lines) if directive in line and not line.strip().startswith("#")), None
        )
        assert index is not None, f"{directive!r} missing from {NGINX_SNIPPET}"
        while lines[index - 1].strip() and not lines[index - 1].strip().startswith("#"):
            index -= 1  # a group of related directives shares its comment
        assert lines[index - 1].strip().startswith("#"), f"{directive!r} has no comment saying why"
    assert "keepalive 64;" in snippet_sections()["http: upstream"]


@pytest.mark.parametrize("signer", SIGNERS)
@pytest.mark.parametrize("mode", MODES)
async def test_signed_sse_streams_event_by_event(start_stack, upstream: Upstream, mode: str, signer: str) -> None:
    stack = await start_stack(**MODES[mode])
    send, receive = trio.open_memory_channel[bytes](0)
    upstream.behaviour = sse_from(receive)
    url = sign(
        stack.public_base,
        upstream.base + "/v1/chat/completions",
        signer=signer,
        method="POST",
        headers={"Content-Type": "application/json"},
        body=BODY,
    )
    assert url.startswith(stack.public_base + "/?X-Sw-")
    async with httpx.AsyncClient(trust_env=False, timeout=WAIT) as client:
        with trio.fail_after(WAIT):
            async with client.stream(
                "POST", url, content=BODY, headers={"Content-Type": "application/json"}
            ) as response:
                assert response.status_code == 200, (await response.aread()).decode()
                assert response.headers["content-type"] == "text/event-stream"
                async with SSEReader(response) as reader:
                    for event in EVENTS:
                        # The upstream has sent exactly the events so far and holds the rest
                        # back until this one has reached the client: nothing may sit in a buffer.
                        await send.send(event)
                        assert await reader.next_event() == event
                    await send.aclose()
                    assert await reader.next_event() is None
    (request,) = upstream.requests
    assert request.path == "/v1/chat/completions"
    assert request.body == BODY.encode()
    assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "x-forwarded-prefix" not in request.headers


async def test_stripped_prefix_needs_configuration(start_stack, upstream: Upstream) -> None:
    """Without public_path_prefix or trusted_proxies, a stripped /ai cannot be verified."""
    stack = await start_stack(strip_prefix=True)
    url = sign(stack.public_base, upstream.base + "/v1/models", method="GET")
    async with httpx.AsyncClient(trust_env=False, timeout=WAIT) as client:
        response = await client.get(url)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "signature_mismatch"
    assert upstream.requests == []


REFUSALS = {
    "expired": (403, "expired", dict(when=datetime.now(UTC) - timedelta(minutes=10))),
    "bad_signature": (403, "signature_mismatch", {}),
    "unknown_credential": (401, "unknown_credential", dict(id="someone-else")),
    "not_signed": (400, "missing_signature_params", {}),
}


@pytest.mark.parametrize("case", REFUSALS)
async def test_refusals_pass_through_nginx_with_json_and_cors(start_stack, upstream: Upstream, case: str) -> None:
    stack = await start_stack(cors=CorsConfig(allow_origins=(ORIGIN,)))
    status, code, sign_kw = REFUSALS[case]
    url = sign(stack.public_base, upstream.base + "/v1/chat/completions", method="POST", **sign_kw)
    if case == "bad_signature":
        url = url[:-1] + ("0" if url[-1] != "0" else "1")
    elif case == "not_signed":
        url = stack.public_base + "/v1/chat/completions"
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 200_000}]})  # unread by Parkway
    async with httpx.AsyncClient(trust_env=False, timeout=WAIT) as client:
        response = await client.post(url, content=body, headers={"Origin": ORIGIN, "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["x-request-id"]
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert upstream.connections == 0 and upstream.requests == []


async def test_large_unsigned_body_streams_through_intact(start_stack, nursery: trio.Nursery) -> None:
    probe = await nursery.start(BodyProbe().serve)
    stack = await start_stack()
    url = sign(stack.public_base, f"http://127.0.0.1:{probe.port}/v1/files", signer="proxy.signing", method="POST")
    block = bytes(range(256)) * 256  # 64 KiB
    blocks = 80  # 5 MiB
    held_back_from = 32  # 2 MiB sent, 3 MiB held back until the upstream has seen 1 MiB

    async def body() -> AsyncIterator[bytes]:
        for i in range(blocks):
            if i == held_back_from:
                # Only a streaming path gets here: nginx with request buffering would wait
                # for the whole body before sending Parkway a single byte.
                with trio.fail_after(WAIT):
                    await probe.wait_received(1 << 20)
            yield block

    async with httpx.AsyncClient(trust_env=False, timeout=WAIT) as client:
        with trio.fail_after(3 * WAIT):
            response = await client.post(url, content=body())
    assert response.status_code == 200, response.text
    assert response.json() == {
        "length": blocks * len(block),
        "sha256": hashlib.sha256(block * blocks).hexdigest(),
        "chunked": True,  # nobody buffered it to learn its length
    }


async def test_client_disconnect_at_nginx_cancels_the_upstream(start_stack, upstream: Upstream) -> None:
    stack = await start_stack()
    send, receive = trio.open_memory_channel[bytes](0)
    upstream.behaviour = sse_from(receive)
    url = sign(stack.public_base, upstream.base + "/v1/chat/completions", method="POST")
    with watch_logs() as logs:
        async with send:
            # A raw socket as the browser: httpx cannot drop a half-read stream under Trio
            # without leaving its async generators to the garbage collector.
            with trio.fail_after(WAIT):
                async with await trio.open_tcp_stream("127.0.0.1", stack.nginx_port) as stream:
                    await stream.send_all(request_bytes("POST", url, BODY.encode()))
                    await send.send(EVENTS[0])
                    received = b""
                    while EVENTS[0] not in received:
                        received += await stream.receive_some(65536)
            assert received.startswith(b"HTTP/1.1 200 ")
            # The browser's socket is closed: nginx closes its connection to Parkway, and
            # Parkway must hang up on the upstream (that is what stops token billing).
            with trio.fail_after(WAIT):
                await upstream.disconnected.wait()
                entry = await logs.wait_for(event="request", outcome="client_gone")
    assert entry["status"] == 200
    assert bytes(upstream.exchanges[0].sent_body) == EVENTS[0]


@pytest.mark.parametrize("trusted", [True, False], ids=["nginx-trusted", "nginx-not-trusted"])
async def test_forwarded_for_is_believed_only_from_trusted_proxies(
    start_stack, upstream: Upstream, trusted: bool
) -> None:
    # nginx is at 127.0.0.1; the "browser" connects from 127.0.0.2 and forges a chain.
    stack = await start_stack(trusted_proxies=("127.0.0.1/32",) if trusted else ())
    url = sign(stack.public_base, upstream.base + "/v1/models", method="GET")
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    with watch_logs() as logs:
        async with httpx.AsyncClient(trust_env=False, timeout=WAIT, transport=transport) as client:
            response = await client.get(url, headers={"X-Forwarded-For": "203.0.113.7"})
        assert response.status_code == 200, response.text
        with trio.fail_after(WAIT):  # Parkway logs just after the response is sent
            entry = await logs.wait_for(event="request")
    (request,) = upstream.requests
    if trusted:
        # nginx appended the browser's address; Parkway appended nginx's. The client is the
        # right-most address that is not a trusted proxy: the forged 203.0.113.7 is ignored.
        assert request.headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.2, 127.0.0.1"
        assert entry["client"] == "127.0.0.2"
    else:
        # nginx's headers are not believed: the chain restarts at nginx.
        assert request.headers["x-forwarded-for"] == "127.0.0.1"
        assert entry["client"] == "127.0.0.1"
    assert request.headers["x-forwarded-proto"] == "http"
