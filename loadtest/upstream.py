"""A lean OpenAI-style upstream for the load tests: one process, one thread, raw epoll.

nginx cannot pace events, and a Trio/h11 server would cost as much as the proxy under test,
so this answers with pre-built bytes from a timer heap. Loopback only. It answers

* ``POST /v1/chat/completions`` with ``"stream": true`` in the body: a chunked
  ``text/event-stream`` of ``events`` OpenAI ``chat.completion.chunk`` events of ``size`` bytes,
  ``interval_ms`` apart (the first at once, ``data: [DONE]`` last); the three come from the
  query string (``?events=100&interval_ms=200&size=140``);
* any other ``POST``/``GET`` to ``/v1/...``: a small fixed ``chat.completion`` JSON (Content-Length).

It insists on ``Authorization: Bearer <key>`` (401 otherwise), so a run proves that the proxy
injected the key. Its own CPU is read by the runner from ``/proc`` and reported, so a reader can
check that it was not the bottleneck. It prints ``READY <port>`` once listening and exits on
SIGTERM or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import select
import signal
import socket
import sys
import time
from urllib.parse import parse_qsl

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
DONE_EVENT = b"data: [DONE]\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_event(size: int) -> bytes:
    """One ``chat.completion.chunk`` event of exactly ``size`` bytes (content padded)."""
    payload = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": ""}}]}
    base = len(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")
    payload["choices"][0]["delta"]["content"] = "x" * max(0, size - base)
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


SMALL_BODY = json.dumps(
    {
        "id": "chatcmpl-loadtest",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "mock-gpt",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello!"}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    },
    separators=(",", ":"),
).encode()
SMALL_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(SMALL_BODY),
    SMALL_BODY,
)
UNAUTHORIZED = b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


class Conn:
    __slots__ = ("sock", "fd", "inbuf", "out", "left", "event", "interval", "closing", "alive", "writing")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = b""
        self.out = b""  # bytes the kernel did not take yet
        self.left = 0  # events still to send on the current stream
        self.event = b""
        self.interval = 0.0
        self.closing = False  # close after the current response
        self.alive = True
        self.writing = False  # EPOLLOUT registered


class Upstream:
    def __init__(self, host: str, port: int, auth: bytes, max_seconds: float):
        self.listener = socket.create_server((host, port), backlog=65535)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.auth = b"authorization: bearer " + auth.lower()
        self.deadline = time.monotonic() + max_seconds
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), EPOLLIN)
        self.conns: dict[int, Conn] = {}
        self.timers: list[tuple[float, int, Conn]] = []
        self.seq = 0
        self.events: dict[int, bytes] = {}
        self.streams = self.requests = 0

    def serve(self) -> None:
        timers, poll, conns, lfd = self.timers, self.epoll.poll, self.conns, self.listener.fileno()
        while True:
            now = time.monotonic()
            if now > self.deadline:
                return
            timeout = min(1.0, max(0.0, timers[0][0] - now)) if timers else 1.0
            for fd, mask in poll(timeout, 4096):
                if fd == lfd:
                    self._accept()
                    continue
                conn = conns.get(fd)
                if conn is None:
                    continue
                if mask & EPOLLIN:
                    self._readable(conn)
                elif mask & EPOLLERR:
                    self._close(conn)
                if mask & EPOLLOUT and conn.alive:
                    self._write(conn, b"")
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                due, _, conn = heapq.heappop(timers)
                if conn.alive:
                    self._tick(conn, due)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and friends: try again on the next poll
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock)
            self.conns[conn.fd] = conn
            self.epoll.register(conn.fd, EPOLLIN)

    def _close(self, conn: Conn) -> None:
        if conn.alive:
            conn.alive = False
            del self.conns[conn.fd]
            try:
                self.epoll.unregister(conn.fd)
            except OSError:
                pass
            conn.sock.close()

    def _readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        if conn.left:  # the proxy sent more while a stream runs (a pipelined request): keep it
            conn.inbuf += data
            return
        conn.inbuf += data
        self._requests(conn)

    def _requests(self, conn: Conn) -> None:
        """Answer every complete request in the buffer (streams hold later ones until done)."""
        while conn.alive and not conn.left:
            buf = conn.inbuf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = buf[:end].lower()
            body_start = end + 4
            length = 0
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17 : j if j >= 0 else len(head)])
                body_end = body_start + length
            elif b"\r\ntransfer-encoding: chunked" in head:
                k = buf.find(b"\r\n0\r\n\r\n", body_start - 2)
                if k < 0:
                    return
                body_end = k + 7
            else:
                body_end = body_start
            if len(buf) < body_end:
                return
            body = buf[body_start:body_end]
            conn.inbuf = buf[body_end:]
            self.requests += 1
            conn.closing = b"\r\nconnection: close" in head
            self._answer(conn, buf[:end], head, body)

    def _answer(self, conn: Conn, raw_head: bytes, head: bytes, body: bytes) -> None:
        target = raw_head.split(b" ", 2)[1]
        path, _, query = target.partition(b"?")
        if self.auth not in head:
            self._respond(conn, UNAUTHORIZED)
        elif not path.startswith(b"/v1/"):
            self._respond(conn, NOT_FOUND)
        elif b'"stream":true' in body.replace(b" ", b""):
            params = dict(parse_qsl(query.decode("latin-1")))
            events = max(1, int(params.get("events", 100)))
            size = int(params.get("size", 140))
            event = self.events.get(size)
            if event is None:
                event = self.events[size] = chunk(sse_event(size))
            conn.left, conn.event = events, event
            conn.interval = float(params.get("interval_ms", 200)) / 1000
            self.streams += 1
            self._tick(conn, time.monotonic(), SSE_HEAD)
        else:
            self._respond(conn, SMALL_RESPONSE)

    def _respond(self, conn: Conn, data: bytes) -> None:
        self._write(conn, data)
        if conn.closing:
            self._close(conn)

    def _tick(self, conn: Conn, due: float, prefix: bytes = b"") -> None:
        """Send the next event; the last one is ``[DONE]`` and the chunked terminator."""
        conn.left -= 1
        if conn.left > 0:
            self._write(conn, prefix + conn.event)
            self.seq += 1
            heapq.heappush(self.timers, (due + conn.interval, self.seq, conn))
            return
        self._write(conn, prefix + chunk(DONE_EVENT) + b"0\r\n\r\n")
        if conn.closing:
            self._close(conn)
        elif conn.inbuf:
            self._requests(conn)

    def _write(self, conn: Conn, data: bytes) -> None:
        if conn.out:
            data = conn.out + data
        if not data:
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.out = data[sent:]
        if conn.out and not conn.writing:
            conn.writing = True
            self.epoll.modify(conn.fd, EPOLLIN | EPOLLOUT)
        elif not conn.out and conn.writing:
            conn.writing = False
            self.epoll.modify(conn.fd, EPOLLIN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="sk-loadtest")
    parser.add_argument("--max-seconds", type=float, default=3600, help="exit after this long, whatever happens")
    args = parser.parse_args(argv)
    if not args.host.startswith("127.") and args.host not in ("::1", "localhost"):
        parser.error("loopback only")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = Upstream(args.host, args.port, args.api_key.encode(), args.max_seconds)
    print(f"READY {server.port}", flush=True)
    try:
        server.serve()
    except (KeyboardInterrupt, SystemExit):
        pass
    print(json.dumps({"streams": server.streams, "requests": server.requests}), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
