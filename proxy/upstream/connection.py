"""One upstream connection as the relay wants it: a raw non-blocking socket, TLS in memory, HTTP/1.1.

The relay moves body bytes with one ``recv`` and one ``send`` per event and no trio stream
layers, so a connection is the stdlib socket itself plus, for ``https``, an ``ssl.SSLObject``
over memory BIOs (what trio's ``SSLStream`` does inside): :meth:`recv_nowait` returns the
plaintext that is there now, or None, and never leaves decrypted bytes behind in the TLS
object, so "the socket is readable" stays the only readiness signal the relay watches.

Connecting is where the SSRF guard sits: the name is resolved once, every address it gives is
checked against the request's :class:`~proxy.upstream.ssrf.AddressPolicy` (a mixed answer is refused,
not filtered), and only checked addresses are connected to, never the name again.

HTTP/1.1 on the connection is :attr:`UpstreamConnection.http` (:class:`~proxy.upstream.wire.UpstreamHTTP`):
h11 (:mod:`proxy.upstream.h11_impl`) or the fast implementation (:mod:`proxy.upstream.httptools_impl`),
as ``[server] http`` chooses (:func:`proxy.http.parsers.resolve`).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import math
import os
import select
import socket
import ssl

import trio

from ..errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from .h11_impl import H11HTTP
from .ssrf import AddressPolicy, Resolver, resolve
from .tlssession import KeptSession, keep, wrap
from .wire import UpstreamHTTP

RECEIVE_SIZE = 65536


_LITERALS: dict[str, str | None] = {}  # host -> its canonical address, None for a name (what _literal found)
_LITERALS_MAX = 1024  # a bound, not a working set: cleared when full


def _literal(host: str) -> str | None:
    """The address ``host`` is when it is an IP literal, else None; remembered per host (an
    upstream host repeats, and a name costs ``ipaddress`` two refusals raised and caught)."""
    try:
        return _LITERALS[host]
    except KeyError:
        pass
    try:
        literal: str | None = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        literal = None
    if len(_LITERALS) >= _LITERALS_MAX:
        _LITERALS.clear()
    _LITERALS[host] = literal
    return literal


def new_http(parser: str = "h11") -> UpstreamHTTP:
    """HTTP/1.1 for one new connection: ``parser`` is ``h11`` or ``httptools`` (already resolved)."""
    if parser == "httptools":
        return _httptools_http()()
    return H11HTTP()


@functools.cache
def _httptools_http() -> type[UpstreamHTTP]:
    """The fast implementation's class, imported once httptools was chosen (it is optional); an
    import statement per connection cost 1.6 µs, ten times making the object."""
    from .httptools_impl import HttptoolsHTTP

    return HttptoolsHTTP


class UpstreamConnection:
    """A connected (and, for https, TLS-established) socket to one upstream origin."""

    __slots__ = ("_in", "_out", "_poller", "_tls", "fd", "host", "http", "idle_since", "sent", "sock")

    def __init__(self, sock: socket.socket, host: str, tls: ssl.SSLObject | None = None,
                 bios: tuple[ssl.MemoryBIO, ssl.MemoryBIO] | None = None, *, parser: str = "h11"):  # fmt: skip
        self.sock = sock
        self.fd = sock.fileno()
        self.host = host  # host[:port], for messages
        self.http = new_http(parser)
        self.idle_since = 0.0
        self.sent = 0  # bytes written to the socket: whether any of a request went out
        # Made when the connection is first checked (pooled), not at connect: 300 bytes a parked stream.
        self._poller: select.poll | None = None
        self._tls = tls
        self._in: ssl.MemoryBIO | None = bios[0] if bios is not None else None
        self._out: ssl.MemoryBIO | None = bios[1] if bios is not None else None

    @property
    def tls(self) -> bool:
        return self._tls is not None

    @property
    def tls_resumed(self) -> bool:
        return self._tls is not None and self._tls.session_reused

    @property
    def tls_session(self) -> KeptSession | None:
        """The TLS session to resume on the next connection to the same origin (a cheaper handshake);
        None while there is none that can be: TLS 1.3 resumes only with a ticket, which the server
        sends after the handshake (it has come by the time the response head has)."""
        return None if self._tls is None else keep(self._tls)

    # --- connecting ---------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        policy: AddressPolicy,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
        resolver: Resolver = resolve,
        tls_session: KeptSession | None = None,
        parser: str = "h11",
    ) -> UpstreamConnection:
        """Resolve, check every address, connect to the first that answers, then TLS if asked.

        Raises ``Forbidden`` (the SSRF guard), :class:`UpstreamConnectError` or
        :class:`UpstreamTimeout`; the whole of it is limited by ``timeout``.
        """
        name = f"{host}:{port}"
        deadline = trio.current_time() + timeout if timeout and math.isfinite(timeout) else math.inf
        literal = _literal(host)
        if literal is not None and ssl_context is None:
            # The usual proxied connection: nothing to resolve and no handshake, so the only wait
            # is the TCP connect's, and it has its own scope (opened only when the connect did
            # not complete within the call, as it does to a peer on this host).
            policy.check(literal, host=host)
            return cls(await _connect_first([literal], port, name, deadline), name, parser=parser)
        with trio.CancelScope(deadline=deadline) as scope:
            if literal is not None:
                addresses = [literal]
            else:
                try:
                    addresses = await resolver(host, port)
                except OSError as exc:
                    raise UpstreamConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from None
                if not addresses:
                    raise UpstreamConnectError(f"{host} has no address")
            for address in addresses:  # all of them: a mixed answer is refused, not filtered
                policy.check(address, host=host)
            sock = await _connect_first(addresses, port, name, math.inf)  # (this scope's deadline)
            conn = cls(sock, name, parser=parser)
            if ssl_context is not None:
                try:
                    await conn._start_tls(ssl_context, host.strip("[]"), tls_session)
                except BaseException:
                    conn.close()
                    raise
            return conn
        assert scope.cancelled_caught  # (only the deadline leaves the scope without a return or a raise)
        raise UpstreamTimeout(f"connecting to {name} timed out")

    async def _start_tls(self, context: ssl.SSLContext, server_hostname: str, session: KeptSession | None) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = wrap(context, incoming, outgoing, server_hostname, session)
        self._tls, self._in, self._out = tls, incoming, outgoing
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._send_raw(outgoing.read())
                data = await self._recv_raw()
                if not data:
                    raise UpstreamConnectError(f"{self.host} closed the connection during the TLS handshake") from None
                incoming.write(data)
            except ssl.SSLError as exc:
                raise UpstreamConnectError(f"TLS with {self.host} failed: {exc.reason or exc}") from None
        await self._send_raw(outgoing.read())

    # --- raw socket ---------------------------------------------------------------------------

    async def _recv_raw(self) -> bytes:
        while True:
            try:
                return self.sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
            except OSError as exc:
                raise UpstreamProtocolError(f"connection to {self.host} lost: {exc.strerror or exc}") from None

    async def _send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            except OSError as exc:
                raise UpstreamProtocolError(f"connection to {self.host} lost: {exc.strerror or exc}") from None
            view = view[sent:]

    # --- what the exchange and the relay use --------------------------------------------------

    def seal(self, data: bytes) -> bytes:
        """The bytes that carry ``data`` on the wire (encrypted for TLS): what :meth:`send_sealed` sends."""
        if self._tls is None:
            return data
        assert self._out is not None
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            raise UpstreamProtocolError(f"TLS with {self.host} failed: {exc.reason or exc}") from None
        return self._out.read()

    async def send_all(self, data: bytes) -> None:
        """Send ``data`` (encrypted for TLS); waits while the socket is full."""
        await self.send_sealed(self.seal(data))

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Send what the socket takes now of wire bytes from :meth:`seal`: how many went (0 when full)."""
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise UpstreamProtocolError(f"connection to {self.host} lost: {exc.strerror or exc}") from None
        self.sent += sent
        return sent

    async def send_sealed(self, data: bytes | memoryview, *, watch: bool = False) -> memoryview:
        """Send wire bytes from :meth:`seal`; what is left unsent (empty once all went).

        With ``watch``, a full socket is waited on together with the peer's side, and the send
        stops when the peer has something to say (an early answer, RFC 9112 §9.3: a server may
        answer before reading the request body, and then stop reading it)."""
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                if not watch:
                    await trio.lowlevel.wait_writable(self.sock)
                elif await _writable_or_readable(self.sock):
                    return view
                continue
            except OSError as exc:
                raise UpstreamProtocolError(f"connection to {self.host} lost: {exc.strerror or exc}") from None
            self.sent += sent
            view = view[sent:]
        return view

    def recv_nowait(self) -> bytes | None:
        """Plaintext available now: bytes, ``b""`` at the end of the stream, None when nothing yet."""
        try:
            raw = self.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise UpstreamProtocolError(f"connection to {self.host} lost: {exc.strerror or exc}") from None
        tls = self._tls
        if tls is None:
            return raw
        assert self._in is not None and self._out is not None
        if raw:
            self._in.write(raw)
        else:
            self._in.write_eof()
        pieces = []
        eof = not raw
        incoming = self._in
        while True:
            try:
                piece = tls.read(RECEIVE_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # close_notify, or a TCP close without it
                eof = True
                break
            except ssl.SSLError as exc:
                raise UpstreamProtocolError(f"TLS with {self.host} failed: {exc.reason or exc}") from None
            if not piece:
                eof = True
                break
            pieces.append(piece)
            if not incoming.pending and not tls.pending() and raw:
                break  # every record read: skip the read that would only raise SSLWantReadError
        if self._out.pending:  # a TLS 1.3 key update asks for an answer; it fits in the socket
            try:
                self.sock.send(self._out.read())
            except OSError:
                pass
        if pieces:
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return b"" if eof else None

    async def recv(self, *, wait_first: bool = False) -> bytes:
        """The next plaintext bytes (``b""`` at the end of the stream), waiting for them;
        ``wait_first`` skips the read that would find nothing (an answer just asked for)."""
        if wait_first:
            await trio.lowlevel.wait_readable(self.sock)
        while True:
            data = self.recv_nowait()
            if data is not None:
                return data
            await trio.lowlevel.wait_readable(self.sock)

    def has_unexpected_bytes(self) -> bool:
        """True when the idle connection has something to read (stray bytes, or the peer closed
        or reset it): it must not carry another request. One ``poll`` with no wait: what a
        ``recv(MSG_PEEK)`` would see, without the exception Python raises for "nothing" (a
        quarter of the cost, ``loadtest.micro``-style: 0.9-1.2 µs against 3.9-6.4)."""
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        if self.fd < 0:
            return
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
        self.fd = -1


async def _writable_or_readable(sock: socket.socket) -> bool:
    """Wait until ``sock`` can take more or has something to read; True for the latter. Only a
    request whose body fills the socket comes here: two waiters then, never per relayed event."""
    readable = False
    async with trio.open_nursery() as nursery:

        async def reading() -> None:
            nonlocal readable
            await trio.lowlevel.wait_readable(sock)
            readable = True
            nursery.cancel_scope.cancel()

        async def writing() -> None:
            await trio.lowlevel.wait_writable(sock)
            nursery.cancel_scope.cancel()

        nursery.start_soon(reading)
        nursery.start_soon(writing)
    return readable


async def _connect_first(addresses: list[str], port: int, name: str, deadline: float) -> socket.socket:
    """A socket connected to the first address that takes the connection; ``deadline`` limits
    the wait for a connect still under way (math.inf: the caller's scope does)."""
    error: str | None = None
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex((address, port))
            if code in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
                # A peer on this host has answered within the call (the kernel runs the handshake
                # there): one poll that waits for nothing says so, without a trip through trio's
                # epoll (two epoll_ctl, a scheduler turn) and the deadline's cancel scope.
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
                ready = poller.poll(0)
                if not ready:
                    if deadline == math.inf:
                        await trio.lowlevel.wait_writable(sock)
                    else:
                        with trio.CancelScope(deadline=deadline) as scope:
                            await trio.lowlevel.wait_writable(sock)
                        if scope.cancelled_caught:
                            raise UpstreamTimeout(f"connecting to {name} timed out")
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                elif ready[0][1] == select.POLLOUT:  # connected: no error to ask for
                    code = 0
                else:  # refused or reset: POLLERR/POLLHUP, the reason in SO_ERROR
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except BaseException:
            trio.lowlevel.notify_closing(sock)
            sock.close()
            raise
        if code == 0:
            return sock
        trio.lowlevel.notify_closing(sock)
        sock.close()
        error = f"cannot connect to {name}: [Errno {code}] {os.strerror(code)}"
    raise UpstreamConnectError(error or f"cannot connect to {name}")
