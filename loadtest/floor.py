"""The floor: the least a trio proxy in Python can spend on the load test's requests.

``python -m loadtest.floor --port P --upstream 127.0.0.1:U`` is a reverse proxy with nothing
but the bytes: one trio task per client connection, the request head parsed by httptools (h11
when httptools is not installed, or with ``--http h11``), the body read to its end (by its
``Content-Length``, or de-chunked), one raw upstream socket per client connection kept across its
requests, the client's end-to-end headers forwarded with ``Authorization`` injected, and the
answer relayed as it arrives, unchanged (``Content-Length`` or chunked: an SSE stream flows event
by event). No signature, no policy, no log line, no metrics, no timeouts. Sockets are the
standard library's, non-blocking, waited on with ``trio.lowlevel.wait_readable``/``wait_writable``
(a ``trio.SocketStream`` costs about 30 µs more per small request).

What Parkway spends above this floor for the same bytes is what Parkway's own code could remove;
the floor itself is the cost of trio, Python and the head parser. The runner measures it as the
``floor`` target (``python -m loadtest run --targets nginx,parkway,floor``). Loopback only: it
refuses to listen on, or forward to, anything else. It writes one JSON start-up line to stderr
(``{"event": "startup", "http": ...}``, as Parkway's names its parser) and exits after
``--max-seconds``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
from collections import deque
from typing import Any

import trio

try:
    import httptools
except ImportError:  # the bare install: h11 reads both faces
    httptools = None

import h11

# Not forwarded (hop by hop, or set by the proxy itself), as nginx's proxy_pass and Parkway drop them.
DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"authorization",
        b"expect",
    }
)
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
READ = 65536


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def recv(sock: socket.socket) -> bytes:
    """What the kernel has (b"" at EOF), waiting for it only when there is nothing yet."""
    while True:
        try:
            return sock.recv(READ)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Write straight to the socket; wait only for what the kernel did not take."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


class Upstream:
    """One client connection's upstream socket: opened on first use, kept across its requests."""

    def __init__(self, address: tuple[str, int], host: bytes, authorization: bytes) -> None:
        self.address = address
        self.prefix = b"\r\nhost: " + host + b"\r\nauthorization: " + authorization + b"\r\n"
        self.sock: socket.socket | None = None

    async def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect(self.address)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                sock.close()
                raise OSError(error, "connect failed") from None
        self.sock = sock
        return sock

    def head(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], length: int) -> bytes:
        """The forwarded request head: the client's end-to-end fields, the key, the body's length."""
        lines = [method, b" ", target, b" HTTP/1.1", self.prefix]
        for name, value in headers:
            if name.lower() not in DROPPED:
                lines += (name, b": ", value, b"\r\n")
        lines += (b"content-length: ", b"%d" % length, b"\r\n\r\n")
        return b"".join(lines)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# --- httptools --------------------------------------------------------------------------------


class _Request:
    __slots__ = ("url", "headers", "body", "method", "keep_alive")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.method = b""
        self.keep_alive = True


class _RequestReader:
    """httptools callbacks for one client connection: complete requests queue up (pipelining)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.current = _Request()
        self.ready: deque[_Request] = deque()

    def on_message_begin(self) -> None:
        self.current = _Request()

    def on_url(self, url: bytes) -> None:
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.current.body.append(body)

    def on_message_complete(self) -> None:
        request = self.current
        request.method = self.parser.get_method()
        request.keep_alive = self.parser.should_keep_alive()
        self.ready.append(request)


class _ResponseEnd:
    """httptools callbacks for the upstream's answer: only where it ends, and whether it may be reused."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


async def serve_httptools(client: socket.socket, upstream: Upstream) -> None:
    reader = _RequestReader()
    answer = _ResponseEnd()
    while True:
        while not reader.ready:
            data = await recv(client)
            if not data:
                return
            try:
                reader.parser.feed_data(data)
            except httptools.HttpParserError:  # an upgrade included: not this proxy's business
                await send_all(client, BAD_REQUEST)
                return
        request = reader.ready.popleft()
        body = b"".join(request.body)
        out = upstream.head(request.method, request.url, request.headers, len(body)) + body
        for _attempt in (1, 2):
            reused = upstream.sock is not None
            try:
                sock = upstream.sock or await upstream.connect()
            except OSError:
                await send_all(client, BAD_GATEWAY)
                return
            if not reused:
                answer = _ResponseEnd()
            answer.done = False
            try:
                await send_all(sock, out)
                data = await recv(sock)
            except OSError:
                data = b""
            if data or not reused:
                break
            upstream.close()  # a kept connection the upstream had closed: once more on a new one
        while data:
            try:
                answer.parser.feed_data(data)
            except httptools.HttpParserError:
                upstream.close()
                return
            await send_all(client, data)
            if answer.done:
                break
            try:
                data = await recv(sock)
            except OSError:
                data = b""
        else:  # the upstream closed before its answer ended
            upstream.close()
            if not answer.parser.get_status_code():
                await send_all(client, BAD_GATEWAY)
            return
        if not answer.parser.should_keep_alive():
            upstream.close()
        if not request.keep_alive:
            return


# --- h11 (no httptools) -----------------------------------------------------------------------


async def serve_h11(client: socket.socket, upstream: Upstream) -> None:
    """The same proxy with h11 on both faces: a server connection reads the request and writes
    the answer again event by event; a client connection per exchange finds the answer's end."""
    conn = h11.Connection(h11.SERVER)
    while True:
        request: h11.Request | None = None
        body = []
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await recv(client))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # ConnectionClosed, PAUSED
                    return
        except h11.RemoteProtocolError:
            if conn.our_state is h11.IDLE:
                await send_all(client, BAD_REQUEST)
            return
        assert request is not None
        content = b"".join(body)
        out = upstream.head(request.method, request.target, request.headers.raw_items(), len(content)) + content
        reused = upstream.sock is not None
        try:
            sock = upstream.sock or await upstream.connect()
        except OSError:
            await send_all(client, BAD_GATEWAY)
            return
        up = h11.Connection(h11.CLIENT)
        up.send(h11.Request(method=request.method, target=request.target, headers=[("host", "upstream")]))
        up.send(h11.EndOfMessage())
        try:
            await send_all(sock, out)
            first = await recv(sock)
            if not first and reused:  # a kept connection the upstream had closed: once more
                upstream.close()
                sock = await upstream.connect()
                await send_all(sock, out)
                first = await recv(sock)
            up.receive_data(first)
            while True:
                event = up.next_event()
                if event is h11.NEED_DATA:
                    up.receive_data(await recv(sock))
                elif isinstance(event, h11.Response):
                    head = h11.Response(status_code=event.status_code, headers=event.headers, reason=event.reason)
                    await send_all(client, conn.send(head) or b"")
                elif isinstance(event, h11.Data):
                    await send_all(client, conn.send(event) or b"")
                elif isinstance(event, h11.EndOfMessage):
                    await send_all(client, conn.send(h11.EndOfMessage()) or b"")
                    break
                else:  # ConnectionClosed before the end
                    raise h11.RemoteProtocolError("upstream closed")
        except (OSError, h11.RemoteProtocolError):
            upstream.close()
            if conn.our_state is h11.SEND_RESPONSE:
                await send_all(client, BAD_GATEWAY)
            return
        if up.their_state is not h11.DONE:
            upstream.close()
        if conn.our_state is not h11.DONE:
            return
        conn.start_next_cycle()


# --- the server -------------------------------------------------------------------------------


async def _connection(client: socket.socket, serve: Any, upstream: Upstream) -> None:
    try:
        await serve(client, upstream)
    except OSError:  # a client or upstream gone mid-write: its connection ends, nothing else
        pass
    finally:
        upstream.close()
        client.close()


async def serve(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    authorization = f"Bearer {args.api_key}".encode("latin-1")
    handler = serve_httptools if args.http == "httptools" else serve_h11
    listener = socket.create_server((args.host, args.port), backlog=4096)
    listener.setblocking(False)
    with trio.move_on_after(args.max_seconds):
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    client, _ = listener.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(listener)
                    continue
                except OSError:  # EMFILE and friends: the next connection may fare better
                    await trio.sleep(0.01)
                    continue
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                upstream = Upstream((host, int(port)), args.upstream.encode(), authorization)
                nursery.start_soon(_connection, client, handler, upstream)
    listener.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.floor", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="where to listen (loopback only)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the upstream (loopback only)")
    parser.add_argument("--api-key", default="sk-loadtest", help="sent as `Authorization: Bearer KEY`")
    parser.add_argument(
        "--http",
        choices=["auto", "h11", "httptools"],
        default="auto",
        help="head parser: httptools when installed (auto), or h11",
    )
    parser.add_argument("--max-seconds", type=float, default=3600, help="exit after this long, whatever happens")
    args = parser.parse_args(argv)
    upstream_host, _, upstream_port = args.upstream.rpartition(":")
    if not (is_loopback(args.host) and is_loopback(upstream_host) and upstream_port.isdigit()):
        parser.error("loopback only: --host and --upstream must be loopback addresses (127.0.0.1:PORT)")
    if args.http == "auto":
        args.http = "httptools" if httptools is not None else "h11"
    elif args.http == "httptools" and httptools is None:
        parser.error("httptools is not installed (pip install 'parkway[fast]')")
    print(json.dumps({"event": "startup", "http": args.http, "listen": f"{args.host}:{args.port}"}), file=sys.stderr)
    sys.stderr.flush()
    trio.run(serve, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
