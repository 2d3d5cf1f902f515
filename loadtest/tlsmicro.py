"""Micro-costs of a TLS upstream, in-process: each call timed apart, its 10th percentile and median.

    python -m loadtest.tlsmicro [NAME ...]        e.g.  python -m loadtest.tlsmicro read_bio read_sslsocket

What each piece of a TLS upstream connection costs Parkway's process (µs per call): reading one
SSE event (one TLS record of ~160 bytes) with the upstream connection's ``recv_nowait`` (socket
``recv`` into memory BIOs), with an ``ssl.SSLSocket`` that reads the socket itself, and as plain
bytes (the floor); creating the TLS object with and without a session to resume; reading the
session; the client's share of a full and of a resumed TLS 1.3 handshake (creating its TLS
object included: resuming means setting the session). The server side runs
in the same process, untimed, writing into a socketpair. Run it on two checkouts
(``PYTHONPATH=../base``) to compare a change; the whole-stream figures are
``python -m loadtest run --workload parked-tls`` (docs/performance.md).
"""

from __future__ import annotations

import argparse
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from proxy.upstream.tlssession import KeptSession, keep, wrap

from .tls import make_certificate

EVENT = b"data: " + b"x" * 130 + b"\n\n"
Timed = Callable[[], float]  # one call: untimed preparation, then the seconds of the timed part


def quantiles(fn: Timed, number: int) -> tuple[float, float]:
    """µs per call, 10th percentile and median of ``number`` timed calls: every call is timed
    apart, so a busy machine's pauses land in the upper part and leave the low one alone."""
    times = sorted(fn() for _ in range(number))
    return times[number // 10] * 1e6, times[number // 2] * 1e6


class Server:
    """The server side of one TLS connection: an SSLObject whose records go to a socket."""

    def __init__(self, context: ssl.SSLContext, sock: socket.socket):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def pump(self) -> None:
        """Take what the client sent, move the handshake on, send what it produced."""
        try:
            while data := self.sock.recv(65536):
                self.incoming.write(data)
        except BlockingIOError:
            pass
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())


class Bench:
    def __init__(self, cert: Path, key: Path):
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.load_cert_chain(cert, key)
        self.client_ctx = ssl.create_default_context(cafile=str(cert))
        self.keep: list[object] = []  # sockets and objects the timed calls use
        (tls, *_), _, self.session = self._bio_client()
        self.kept = keep(tls)  # Parkway's kept session (proxy.upstream.tlssession)

    def _bio_client(
        self, session: ssl.SSLSession | None = None, kept: KeptSession | None = None
    ) -> tuple[tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, socket.socket, Server], float, ssl.SSLSession]:
        """A handshaken client over memory BIOs and a socketpair; the client's seconds in it
        (``session``: resumed through the stdlib, ``kept``: as Parkway resumes)."""
        mine, theirs = socket.socketpair()
        mine.setblocking(False)
        theirs.setblocking(False)
        server = Server(self.server_ctx, theirs)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        start = time.perf_counter()
        if kept is not None:
            tls = wrap(self.client_ctx, incoming, outgoing, "127.0.0.1", kept)
        else:
            tls = self.client_ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1", session=session)
        spent = time.perf_counter() - start  # with a session, its copy is part of resuming
        for _ in range(8):
            start = time.perf_counter()
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            spent += time.perf_counter() - start
            if outgoing.pending:
                mine.sendall(outgoing.read())
            server.pump()
            try:
                while data := mine.recv(65536):
                    incoming.write(data)
            except BlockingIOError:
                pass
            if done:
                break
        server.send(b"x")  # after the session ticket
        incoming.write(mine.recv(65536))
        start = time.perf_counter()
        tls.read(1024)
        spent += time.perf_counter() - start
        return (tls, incoming, outgoing, mine, server), spent, tls.session

    # --- the pieces ---------------------------------------------------------------------------

    def read_raw(self) -> Timed:
        mine, theirs = socket.socketpair()
        mine.setblocking(False)
        self.keep += [mine, theirs]
        record = EVENT + b"x" * 22  # a record's size on the wire

        def call() -> float:
            theirs.send(record)
            start = time.perf_counter()
            mine.recv(65536)
            return time.perf_counter() - start

        return call

    def read_bio(self) -> Timed:
        from proxy.upstream.connection import UpstreamConnection

        (tls, incoming, outgoing, mine, server), _, _ = self._bio_client()
        conn = UpstreamConnection(mine, "127.0.0.1:443", tls, (incoming, outgoing))
        self.keep += [conn, server]

        def call() -> float:
            server.send(EVENT)
            start = time.perf_counter()
            conn.recv_nowait()
            return time.perf_counter() - start

        return call

    def read_sslsocket(self) -> Timed:
        """``ssl.SSLSocket`` in non-blocking mode reading the socket itself (two ``read`` calls
        per record: OpenSSL reads the record header, then the rest, as read-ahead is off)."""
        mine, theirs = socket.socketpair()
        mine.setblocking(False)
        theirs.setblocking(False)
        server = Server(self.server_ctx, theirs)
        tls = self.client_ctx.wrap_socket(mine, server_hostname="127.0.0.1", do_handshake_on_connect=False)
        for _ in range(8):
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                server.pump()
        server.pump()
        server.send(b"x")
        tls.recv(1024)
        self.keep += [tls, server]

        def call() -> float:
            server.send(EVENT)
            start = time.perf_counter()
            tls.recv(65536)
            return time.perf_counter() - start

        return call

    def wrap(self) -> Timed:
        def call() -> float:
            start = time.perf_counter()
            self.client_ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="127.0.0.1")
            return time.perf_counter() - start

        return call

    def wrap_session(self) -> Timed:
        """The stdlib copies the session through its DER form on the way in (and on the way out:
        ``session_get``), which decodes the server's certificate again."""

        def call() -> float:
            start = time.perf_counter()
            self.client_ctx.wrap_bio(
                ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="127.0.0.1", session=self.session
            )
            return time.perf_counter() - start

        return call

    def wrap_kept(self) -> Timed:
        """Parkway's way (``proxy.upstream.tlssession.wrap``): OpenSSL's in-memory copy of the
        kept session, no DER."""

        def call() -> float:
            start = time.perf_counter()
            wrap(self.client_ctx, ssl.MemoryBIO(), ssl.MemoryBIO(), "127.0.0.1", self.kept)
            return time.perf_counter() - start

        return call

    def session_get(self) -> Timed:
        (tls, *_), _, _ = self._bio_client()

        def call() -> float:
            start = time.perf_counter()
            tls.session  # noqa: B018 (the getter is what is timed)
            return time.perf_counter() - start

        return call

    def handshake_full(self) -> Timed:
        return lambda: self._bio_client()[1]

    def handshake_resumed(self) -> Timed:
        return lambda: self._bio_client(self.session)[1]

    def handshake_kept(self) -> Timed:
        """A resumed handshake as Parkway makes it (fails if it does not resume)."""

        def call() -> float:
            (tls, *_), spent, _ = self._bio_client(kept=self.kept)
            assert tls.session_reused, "the kept session was not resumed"
            return spent

        return call


PIECES = (
    "read_raw",
    "read_bio",
    "read_sslsocket",
    "wrap",
    "wrap_session",
    "wrap_kept",
    "session_get",
    "handshake_full",
    "handshake_resumed",
    "handshake_kept",
)
SLOW = {"wrap_session", "session_get", "handshake_full", "handshake_resumed", "handshake_kept"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.tlsmicro", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"any of {', '.join(PIECES)} (default all)")
    parser.add_argument("--number", type=int, default=20000, help="timed calls (a twentieth for the slow ones)")
    a = parser.parse_args(argv)
    names = a.names or list(PIECES)
    with tempfile.TemporaryDirectory(prefix="parkway-tlsmicro-") as tmp:
        bench = Bench(*make_certificate(Path(tmp)))
        print(f"{'µs per call':18s} {'p10':>8s} {'median':>8s}")
        for name in names:
            number = max(10, a.number // 20) if name in SLOW else a.number
            low, mid = quantiles(getattr(bench, name)(), number)
            print(f"{name:18s} {low:8.1f} {mid:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
