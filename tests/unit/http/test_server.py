"""proxy.http.server over real sockets on the loopback: the accept loops (batches from the
listening socket itself, accept errors, listeners made elsewhere), the peer address, and a
connection's close (the lingering one included).

Real time, with generous ``fail_after`` guards: nothing here waits for a timer to pass except
the 0.1 s retry after an accept error.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import structlog
import trio
from trio.testing import wait_all_tasks_blocked

from proxy.config import ServerConfig
from proxy.errors import ParkwayError, error_response
from proxy.http import server as server_module
from proxy.http.connection import HTTPConnection, RequestHead
from proxy.http.server import Server, bound_address, open_listeners
from proxy.urls import split_host_port
from support.http import parse_response, read_until_eof

GUARD = 60  # real seconds: only a hang reaches it


@pytest.fixture(params=["h11", "httptools"])
def http(request) -> str:
    return request.param


class PeerApp:
    """Answers every request 200 with the peer address the server gave its head."""

    def __init__(self, *, read_body: bool = True):
        self.read_body = read_body

    async def handle(self, head: RequestHead, conn: HTTPConnection) -> None:
        if self.read_body:
            await conn.read_body(1 << 20)
        payload = head.peer.encode()
        if not self.read_body:  # refused at once, the body unread (as a bad signature is)
            await conn.send_full(403, [(b"content-length", str(len(payload)).encode())], payload)
            return
        await conn.send_full(200, [(b"content-length", str(len(payload)).encode())], payload)

    async def reject(self, head: RequestHead | None, conn: HTTPConnection, exc: ParkwayError) -> None:
        status, headers, body = error_response(exc)
        await conn.send_full(status, headers, body)


@asynccontextmanager
async def serving(
    listeners: list[trio.SocketListener], http: str, app: PeerApp | None = None, **config: float
) -> AsyncIterator[Server]:
    """``Server.serve`` on ``listeners`` until the block ends, then shut down (and drained)."""
    server = Server(ServerConfig(http=http, drain_timeout=5.0, **config), app or PeerApp())  # type: ignore[arg-type]
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            yield server
            server.shutdown()


async def connect(listener: trio.SocketListener) -> trio.SocketStream:
    host, port = split_host_port(bound_address(listener))
    return await trio.open_tcp_stream(host, port)


async def get(stream: trio.SocketStream, target: str = "/") -> tuple[int, bytes]:
    """One keep-alive request; the status and body of its answer."""
    await stream.send_all(f"GET {target} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
        chunk = await stream.receive_some()
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class AcceptSteps(trio.abc.Instrument):
    """How many connection tasks each step of an accept loop started."""

    def __init__(self) -> None:
        self.current: trio.lowlevel.Task | None = None
        self.steps: list[int] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.current = task
        if task.name.endswith("_accept_loop"):
            self.steps.append(0)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.current = None

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if self.current is not None and self.current.name.endswith("_accept_loop"):
            assert task.name.endswith("_connection_task"), task.name
            self.steps[-1] += 1


# --- accepting ---------------------------------------------------------------------------


async def test_a_burst_in_the_backlog_is_accepted_in_bounded_batches_and_every_connection_served(http, monkeypatch):
    """40 connections already queued: the first wake-up takes a whole batch (trio's accept took
    one per step), no step takes more than a batch (the loop yields between them), every
    connection is answered with its own peer address, and shutdown closes them all."""
    monkeypatch.setattr(server_module, "ACCEPT_BATCH", 8)
    listeners = await open_listeners(("127.0.0.1:0",))
    clients = [await connect(listeners[0]) for _ in range(40)]  # in the backlog: nothing accepts yet
    for n, client in enumerate(clients):
        await client.send_all(f"GET /{n} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    steps = AcceptSteps()
    trio.lowlevel.add_instrument(steps)
    try:
        async with serving(listeners, http):
            answers = []
            for client in clients:
                data = b""
                while not data.endswith(b"127.0.0.1"):
                    chunk = await client.receive_some()
                    assert chunk, data
                    data += chunk
                answers.append(parse_response(data).status)
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert answers == [200] * 40
    taken = [n for n in steps.steps if n]
    assert taken[0] == 8 and max(taken) == 8 and sum(taken) == 40, steps.steps
    for client in clients:  # shutdown closed each idle keep-alive connection
        with trio.fail_after(GUARD):
            assert await read_until_eof(client) == b""
        await client.aclose()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "address, peer",
    [
        ("127.0.0.1:0", "127.0.0.1"),
        pytest.param("[::1]:0", "::1", marks=pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")),
    ],
)
async def test_the_peer_address_comes_with_the_accepted_connection(http, address, peer):
    listeners = await open_listeners((address,))
    async with serving(listeners, http):
        client = await connect(listeners[0])
        assert await get(client) == (200, peer.encode())
        assert await get(client, "/again") == (200, peer.encode())  # kept alive
        await client.aclose()


class FlakyListeningSocket:
    """The listening socket, its accept failing first with ``errnos`` in turn."""

    def __init__(self, raw: socket.socket, errnos: list[int]):
        self.raw = raw
        self.errnos = errnos

    def fileno(self) -> int:
        return self.raw.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        if self.errnos:
            code = self.errnos.pop(0)
            raise OSError(code, errno.errorcode[code])
        return self.raw.accept()


async def test_accept_errors_are_logged_and_retried_or_skipped_and_the_connection_still_served(http):
    """Out of descriptors (EMFILE): logged and retried after a pause; a connection aborted
    before it was accepted (ECONNABORTED): skipped without a word, as trio's accept does."""
    listeners = await open_listeners(("127.0.0.1:0",))
    flaky = FlakyListeningSocket(server_module._LISTENING[listeners[0]], [errno.EMFILE, errno.ECONNABORTED])
    server_module._LISTENING[listeners[0]] = flaky  # type: ignore[assignment]
    client = await connect(listeners[0])
    with structlog.testing.capture_logs() as logs:
        async with serving(listeners, http):
            started = trio.current_time()
            assert await get(client) == (200, b"127.0.0.1")
            assert trio.current_time() - started >= 0.1  # the retry's pause
            await client.aclose()
    failed = [entry for entry in logs if entry["event"] == "accept_failed"]
    assert failed == [{"event": "accept_failed", "error": "EMFILE", "retry_in": 0.1, "log_level": "error"}], logs
    assert flaky.errnos == []


async def test_an_unexpected_accept_error_is_not_swallowed(http):
    listeners = await open_listeners(("127.0.0.1:0",))
    server_module._LISTENING[listeners[0]] = FlakyListeningSocket(
        server_module._LISTENING[listeners[0]], [errno.EINVAL]
    )  # type: ignore[assignment]
    server = Server(ServerConfig(http=http), PeerApp())  # type: ignore[arg-type]
    with trio.fail_after(GUARD), pytest.raises(ExceptionGroup) as raised:
        await server.serve(listeners)
    assert raised.value.subgroup(lambda exc: isinstance(exc, OSError) and exc.errno == errno.EINVAL), raised.value


async def test_a_listener_made_elsewhere_is_served_through_trio_accept(http):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    assert listeners[0] not in server_module._LISTENING
    async with serving(listeners, http):
        client = await connect(listeners[0])
        assert await get(client) == (200, b"127.0.0.1")
        await client.aclose()


# --- closing -----------------------------------------------------------------------------


async def test_a_refusal_with_the_body_unread_lingers_so_the_client_reads_it_whole(http):
    """The answer goes out before the body is read: the server reads and discards what still
    comes (the socket made a stream only for this) instead of closing on unread bytes, which
    would reset the connection under the client's feet."""
    listeners = await open_listeners(("127.0.0.1:0",))
    async with serving(listeners, http, PeerApp(read_body=False)):
        client = await connect(listeners[0])
        body = 1 << 20
        await client.send_all(f"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {body}\r\n\r\n".encode() + b"x" * 1000)
        answer = b""
        while not answer.endswith(b"127.0.0.1"):
            chunk = await client.receive_some()
            assert chunk, answer
            answer += chunk
        # The rest of the body still goes out whole (a reset would fail these sends), then EOF both ways.
        for _ in range(body // 65536):
            await client.send_all(b"x" * 65536)
        await client.send_eof()
        assert await read_until_eof(client) == b""
        await client.aclose()
    # (parse_response reads one reply that ends with the connection: the server's EOF came.)
    reply = parse_response(answer, "POST")
    assert (reply.status, reply.headers.get("connection")) == (403, "close")


class OptionsApp(PeerApp):
    """Answers with the accepted socket's TCP_NODELAY and TCP_NOTSENT_LOWAT."""

    async def handle(self, head: RequestHead, conn: HTTPConnection) -> None:
        await conn.read_body(1 << 20)
        sock = conn.socket
        assert sock is not None
        lowat = getattr(socket, "TCP_NOTSENT_LOWAT", None)
        options = [sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)]
        if lowat is not None:
            options.append(sock.getsockopt(socket.IPPROTO_TCP, lowat))
        payload = ",".join(str(o) for o in options).encode()
        await conn.send_full(200, [(b"content-length", str(len(payload)).encode())], payload)


async def test_an_accepted_connection_sends_each_write_at_once(http):
    """No Nagle delay on the client's socket (an SSE event goes out when written), and 16 KB
    unsent at most before it counts as full, as trio's SocketStream set them."""
    listeners = await open_listeners(("127.0.0.1:0",))
    async with serving(listeners, http, OptionsApp()):
        client = await connect(listeners[0])
        status, body = await get(client)
        await client.aclose()
    assert status == 200
    nodelay, *lowat = body.split(b",")
    assert int(nodelay) != 0
    assert [int(v) for v in lowat] in ([], [1 << 14])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux copies a listener's TCP options")
async def test_on_linux_the_listening_socket_carries_the_options_its_connections_inherit(http, monkeypatch):
    """Set once on the listener (Linux copies them to each accepted socket), not per connection:
    an accepted socket has them although nothing sets them on it."""
    set_on: list[socket.socket] = []
    original = server_module._set_options

    def set_options(sock: socket.socket) -> None:
        set_on.append(sock)
        original(sock)

    monkeypatch.setattr(server_module, "_set_options", set_options)
    listeners = await open_listeners(("127.0.0.1:0",))
    raw = listeners[0].socket
    assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 1 << 14
    async with serving(listeners, http, OptionsApp()):
        client = await connect(listeners[0])
        assert await get(client) == (200, b"1,16384")
        await client.aclose()
    assert len(set_on) == 1  # the listener's


# --- a connection's own steps and its close ----------------------------------------------


class ConnectionSteps(trio.abc.Instrument):
    """How many steps the connection tasks ran."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("_connection_task"):
            self.steps += 1


async def test_a_request_and_the_close_already_there_take_the_connection_two_steps(http):
    """The head and the client's end are in the socket when it is accepted: its task reads the
    head (and yields once, as every read that finds bytes does), answers, and ends at the
    client's end without a step more for it (nothing else is read): two task steps in all,
    where the read that found the end yielded too (three)."""
    listeners = await open_listeners(("127.0.0.1:0",))
    client = await connect(listeners[0])  # in the backlog: nothing accepts yet
    await client.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    await client.send_eof()
    steps = ConnectionSteps()
    trio.lowlevel.add_instrument(steps)
    try:
        async with serving(listeners, http):
            with trio.fail_after(GUARD):
                answer = await read_until_eof(client)
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert parse_response(answer).status == 200
    assert steps.steps == 2
    await client.aclose()


async def test_an_accepted_connection_is_closed_without_trio_notify_closing(http, monkeypatch):
    """Nothing waits on an accepted socket once its task ends, so it is closed as it is: no
    ``notify_closing`` (whose ``EPOLL_CTL_DEL`` fails for a socket trio never waited on, and
    is not needed for one it did: the close takes it out of the set). The listener's own close
    at shutdown still goes through trio."""
    notified: list[int] = []
    original = trio.lowlevel.notify_closing

    def notify_closing(fd) -> None:  # noqa: ANN001 - trio's own signature
        notified.append(fd if isinstance(fd, int) else fd.fileno())
        original(fd)

    monkeypatch.setattr(trio.lowlevel, "notify_closing", notify_closing)
    listeners = await open_listeners(("127.0.0.1:0",))
    async with serving(listeners, http):
        client = await connect(listeners[0])
        assert await get(client) == (200, b"127.0.0.1")  # a keep-alive wait on it in between:
        assert await get(client, "/again") == (200, b"127.0.0.1")  # trio waited on this socket
        await client.send_eof()
        with trio.fail_after(GUARD):
            assert await read_until_eof(client) == b""  # the server closed it
        assert notified == []
    await client.aclose()


# --- the head waits of an accepted socket, stopped without a cancel scope -----------------
# (Real time: the limits are short, the checks generous; nothing here can pass by waiting.)


class ScopeCount(trio.abc.Instrument):
    """Cancel scopes a connection task opened, by the cancel status it steps in (a new status
    object for each scope it enters)."""

    def __init__(self) -> None:
        self.statuses: set[int] = set()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("_connection_task"):
            self.statuses.add(id(task._cancel_status))


async def test_an_accepted_connection_waits_for_its_heads_without_a_cancel_scope(http):
    """Two requests on a kept-alive connection, each head waited for: every step of the
    connection's task, its first included, runs in the cancel status it was spawned in (no
    scope of its own around its head waits)."""
    listeners = await open_listeners(("127.0.0.1:0",))
    scopes = ScopeCount()
    async with serving(listeners, http):
        trio.lowlevel.add_instrument(scopes)
        try:
            client = await connect(listeners[0])
            assert await get(client) == (200, b"127.0.0.1")
            assert await get(client, "/again") == (200, b"127.0.0.1")
            await client.send_eof()
            with trio.fail_after(GUARD):
                assert await read_until_eof(client) == b""
        finally:
            trio.lowlevel.remove_instrument(scopes)
        await client.aclose()
    assert len(scopes.statuses) == 1, scopes.statuses


async def test_an_accepted_connection_idle_past_its_limit_is_closed_silently(http):
    listeners = await open_listeners(("127.0.0.1:0",))
    async with serving(listeners, http, keepalive_timeout=0.3, header_read_timeout=0.3):
        client = await connect(listeners[0])
        assert await get(client) == (200, b"127.0.0.1")
        started = trio.current_time()
        with trio.fail_after(GUARD):
            assert await read_until_eof(client) == b""
        assert trio.current_time() - started >= 0.3
        await client.aclose()


async def test_an_accepted_connection_whose_head_trickles_past_its_limit_gets_408(http):
    listeners = await open_listeners(("127.0.0.1:0",))
    async with serving(listeners, http, header_read_timeout=0.3):
        client = await connect(listeners[0])
        await client.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n")  # and no more
        with trio.fail_after(GUARD):
            answer = await read_until_eof(client)
        reply = parse_response(answer)
        assert (reply.status, reply.headers.get("connection")) == (408, "close")
        await client.aclose()


async def test_shutdown_closes_an_accepted_connection_waiting_for_its_head(http):
    listeners = await open_listeners(("127.0.0.1:0",))
    async with serving(listeners, http, keepalive_timeout=3600, header_read_timeout=3600) as server:
        client = await connect(listeners[0])
        assert await get(client) == (200, b"127.0.0.1")
        fresh = await connect(listeners[0])  # accepted, its first head never comes
        while server.open_connections < 2:
            await trio.sleep(0.01)
        await wait_all_tasks_blocked()
        server.shutdown()
        with trio.fail_after(GUARD):
            assert await read_until_eof(client) == b""
            assert await read_until_eof(fresh) == b""
    await client.aclose()
    await fresh.aclose()
