"""Upstreams for relay and pool tests: one that sends scripted raw bytes, one that speaks TLS.

The scripted upstream answers each request with exactly the bytes a test gives (malformed
framing, stray bytes after a response, both Content-Length and chunked ...), which no HTTP
library would send; it records which connection every request came on, so a test can tell a
reused connection from a new one.
"""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from support.loopback import LoopbackServer, receive_head
from support.upstream import Upstream

Answer = Callable[["ScriptedRequest"], Awaitable[None]]


@dataclass
class ScriptedRequest:
    """One request as the scripted upstream read it, and the means to answer it."""

    connection: int  # 1, 2, ...: which upstream connection carried it
    head: bytes
    stream: trio.SocketStream
    close_after: bool = False  # close the connection once the answer is sent

    @property
    def target(self) -> str:
        return self.head.split(b" ", 2)[1].decode()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)


def answer_with(data: bytes, *, close: bool = False) -> Answer:
    async def answer(req: ScriptedRequest) -> None:
        await req.send(data)
        req.close_after = close

    return answer


@dataclass
class ScriptedUpstream(LoopbackServer):
    """Raw HTTP/1.1 on 127.0.0.1: ``answers`` are used in order, one per request."""

    answers: list[Answer] = field(default_factory=list)
    requests: list[ScriptedRequest] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    disconnected: trio.Event = field(default_factory=trio.Event)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        buf = b""
        try:
            while True:
                received = await receive_head(stream, buf)
                if received is None:
                    return
                head, buf = received
                length = next(
                    (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
                    0,
                )  # fmt: skip
                while len(buf) < length:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                req = ScriptedRequest(number, head, stream)
                self.requests.append(req)
                await self.answers.pop(0)(req)
                if req.close_after:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.disconnected.set()
        finally:
            await trio.aclose_forcefully(stream)


# --- TLS ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_certificate(directory: Path, names: str = "IP:127.0.0.1") -> Certificate:
    """A throwaway self-signed certificate for ``names`` (its subjectAltName: 127.0.0.1 unless
    told), made with the openssl command."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", f"subjectAltName={names}", "-addext", "basicConstraints=critical,CA:TRUE"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    except FileNotFoundError:
        pytest.skip("the openssl command is needed to make a test certificate")
    return Certificate(cert, key)


class _ServerTLSStream(trio.abc.Stream):
    """A server-side SSLStream that also answers ``.socket`` (the test upstream reads its peer there)."""

    def __init__(self, stream: trio.SocketStream, context: ssl.SSLContext):
        self.socket = stream.socket
        self._tls = trio.SSLStream(stream, context, server_side=True)

    @property
    def session_reused(self) -> bool:
        """Whether the client resumed a TLS session (valid once a request has been read)."""
        return bool(self._tls.session_reused)

    @property
    def version(self) -> str | None:
        """The TLS version agreed on ("TLSv1.3"), once a request has been read."""
        return self._tls.version()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._tls.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._tls.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._tls.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self._tls.transport_stream.send_eof()

    async def aclose(self) -> None:
        await self._tls.aclose()


class TLSUpstream(Upstream):
    """The h11 test upstream of ``helpers``, serving https with ``certificate``."""

    def __init__(self, certificate: Certificate, behaviour=None, *, maximum_version: ssl.TLSVersion | None = None):
        super().__init__() if behaviour is None else super().__init__(behaviour)
        self._context = certificate.server_context()
        if maximum_version is not None:
            self._context.maximum_version = maximum_version
        self.server_names: list[str | None] = []  # the SNI of each handshake, in order
        self._context.sni_callback = lambda _tls, name, _context: self.server_names.append(name)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def _connection(self, stream: trio.abc.Stream) -> None:
        await super()._connection(_ServerTLSStream(stream, self._context))
