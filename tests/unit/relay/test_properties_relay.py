"""What the client receives through the relay is what h11 says the upstream answered (Hypothesis).

Random valid and invalid upstream responses (status line, 1xx before it, headers,
Content-Length / chunked / close-delimited framing, chunk extensions, trailers, bodies; then
truncated, corrupted or followed by junk) are split at random byte boundaries and written by
a real loopback upstream socket; Parkway's gateway (:meth:`Gateway.handle`: upstream client on each HTTP/1.1 implementation,
head, relay on the portable driver, error mapping) answers a real ``h11.Connection(h11.CLIENT)``
on an in-memory stream. The oracle is h11 too: the same bytes fed to a client connection that
sent the same request. Then, for every example:

* h11 reads a complete answer: the client gets its status and exactly its body (none for a
  HEAD), properly ended, and promptly (not after one of Parkway's timeouts);
* h11 refuses the answer before its head ended: the client gets a framed 502;
* h11 refuses it after the head (or it stops short): the client gets a 502, or that status
  with a body cut short and the connection closed -- never a complete-looking answer;
* never a hang.

Where h11 is stricter than RFC 9112 (whitespace before a chunk extension, §7.1.1), the oracle
reads the same message without it. Deterministic (derandomized, no database) and bounded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import h11
import pytest
import trio
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from trio.testing import memory_stream_pair

from proxy.gateway.handler import Gateway
from proxy.http.server import open_connection
from proxy.upstream.client import UpstreamClient
from support.parkway import make_config
from support.signing import sign

RELAY = settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # No shrinking: a failure is reported as found (shrinking one through sockets can take minutes).
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
TIMEOUT = 4.0  # Parkway's upstream timeouts here: a complete answer must arrive well before
PROMPT = 2.0  # ... within this (an example takes milliseconds; waiting for a timeout takes TIMEOUT)
HANG = 8.0  # bound of one example

TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)
VALUE = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ;=,./:", max_size=20).map(str.strip)
BODY = st.binary(max_size=3000)
STATUS = st.one_of(st.sampled_from([200, 201, 202, 204, 206, 301, 302, 304, 400, 401, 404, 429, 500, 503]),
                   st.integers(200, 599))  # fmt: skip


@dataclass(frozen=True)
class Wire:
    """An upstream answer as written (``wire``) and as the oracle reads it (``oracle``)."""

    wire: bytes
    oracle: bytes
    close: bool  # the upstream closes after writing it


@st.composite
def chunk_lines(draw: st.DrawFn, size: int, bws: bool) -> tuple[bytes, bytes]:
    """A chunk-size line for ``size``: (as sent, as the oracle reads it)."""
    digits = f"{size:x}"
    digits = draw(st.sampled_from([digits, digits.upper(), "0" * draw(st.integers(0, 3)) + digits]))
    if not draw(st.booleans()):
        return digits.encode(), digits.encode()
    name, value = draw(TOKEN), draw(st.one_of(st.none(), TOKEN, VALUE.map(lambda v: '"' + v.replace('"', "") + '"')))
    ext = ";" + name + ("" if value is None else "=" + value)
    space = draw(st.sampled_from(["", "", " ", "\t", "  "])) if bws else ""  # RFC 9112 §7.1.1: BWS before ";"
    return (digits + space + ext).encode(), (digits + ext).encode()


@st.composite
def answers(draw: st.DrawFn, method: str) -> Wire:
    # Something wrong with it, sometimes: what h11 refuses must be refused, never guessed at.
    damage = draw(st.sampled_from(["none"] * 5 + ["cut_head", "cut_body", "cut_body", "corrupt", "corrupt", "junk",
                                                  "conflict", "garbage"]))  # fmt: skip
    exact = damage in ("cut_body", "corrupt")  # damaged in the body: the oracle reads the very same bytes
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.0"]))
    status = draw(STATUS)
    interim = b"".join(b"HTTP/1.1 %d Info\r\n\r\n" % c for c in draw(st.lists(st.sampled_from([100, 102, 103]),
                                                                                 max_size=2)))  # fmt: skip
    headers = [b"X-%s: %s" % (n.encode(), v.encode()) for n, v in draw(st.lists(st.tuples(TOKEN, VALUE), max_size=4))]
    body = draw(BODY)
    framing = draw(st.sampled_from(["length", "length", "chunked", "chunked", "close"]))
    if version == b"1.0" and framing == "chunked":
        framing = "length"
    connection = draw(st.sampled_from([None, b"close", b"keep-alive"]))
    if connection:
        headers.append(b"Connection: " + connection)
    no_body = method == "HEAD" or status in (204, 304)
    tail, oracle_tail = b"", b""
    if framing == "length":
        headers.append(b"Content-Length: %d" % len(body))
        tail = oracle_tail = b"" if no_body else body
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        if not no_body:
            cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=6)))) if body else []
            pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if body[a:b]]
            for piece in [*pieces, b""]:
                sent, read = draw(chunk_lines(len(piece), bws=not exact))
                tail += sent + b"\r\n" + piece + (b"\r\n" if piece else b"")
                oracle_tail += read + b"\r\n" + piece + (b"\r\n" if piece else b"")
            trailers = b"".join(b"X-T%s: %s\r\n" % (n.encode(), v.encode())
                                for n, v in draw(st.lists(st.tuples(TOKEN, VALUE), max_size=2)))  # fmt: skip
            tail += trailers + b"\r\n"
            oracle_tail += trailers + b"\r\n"
    else:
        tail = oracle_tail = b"" if no_body else body
    head = interim + b"HTTP/%s %d %s\r\n" % (version, status, b"Whatever") + b"".join(h + b"\r\n" for h in headers)
    wire, oracle = head + b"\r\n" + tail, head + b"\r\n" + oracle_tail
    close = framing == "close" or draw(st.booleans())
    if damage == "cut_head" and wire == oracle:
        wire = oracle = wire[: draw(st.integers(0, len(head)))]
        close = True
    elif damage == "cut_body" and tail:
        wire = oracle = wire[: draw(st.integers(len(head) + 2, len(wire) - 1))]
        close = True
    elif damage == "corrupt" and tail:
        at = len(head) + 2 + draw(st.integers(0, len(tail) - 1))
        byte = draw(st.sampled_from([b"\x00", b"z", b"\r", b"\n", b" "]))
        if (
            byte == b"\r"
            and framing == "chunked"
            and re.match(rb"[0-9A-Fa-f]+[ \t]*;", wire[wire.rfind(b"\n", 0, at) + 1 :])
        ):
            byte = b"z"  # a bare CR in a chunk extension: h11 takes it, RFC 9112 §2.2 and Parkway do not
        wire = oracle = wire[:at] + byte + wire[at + 1 :]
        close = True
    elif damage == "junk":
        junk = draw(st.sampled_from([b"JUNK", b"HTTP/1.1 200 OK\r\n\r\n", b"\r\n"]))
        wire, oracle = wire + junk, oracle + junk
    elif damage == "conflict" and framing == "length" and not no_body:
        extra = b"Content-Length: %d\r\n" % (len(body) + 1)
        wire, oracle = (
            wire.replace(b"\r\n\r\n", b"\r\n" + extra + b"\r\n", 1),
            oracle.replace(b"\r\n\r\n", b"\r\n" + extra + b"\r\n", 1),
        )
    elif damage == "garbage":
        wire = oracle = draw(st.sampled_from([b"HELLO THERE\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n", b"\x16\x03\x01junk",
                                              b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n"]))  # fmt: skip
        close = True
    if not _complete_without_close(oracle, method):
        close = True  # an upstream that goes silent mid-answer is the timeouts' business, not this test's
    return Wire(wire, oracle, close)


@dataclass
class Verdict:
    status: int | None  # None: the upstream failed
    body: bytes = b""
    interim: tuple[int, ...] = ()
    head: int | None = None  # failed after this head


def _h11_client(method: str) -> h11.Connection:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "upstream")]))
    conn.send(h11.EndOfMessage())
    return conn


def oracle(data: bytes, method: str, close: bool) -> Verdict:
    conn = _h11_client(method)
    if data:
        conn.receive_data(data)
    if close:
        conn.receive_data(b"")
    verdict = Verdict(None)
    interim: list[int] = []
    body = bytearray()
    try:
        while True:
            event = conn.next_event()
            if type(event) is h11.InformationalResponse:
                interim.append(event.status_code)
            elif type(event) is h11.Response:
                verdict.head = event.status_code
            elif type(event) is h11.Data:
                body += event.data
            elif type(event) is h11.EndOfMessage:
                return Verdict(verdict.head, bytes(body), tuple(interim))
            else:
                return verdict
    except h11.RemoteProtocolError:
        return verdict


def _complete_without_close(data: bytes, method: str) -> bool:
    return oracle(data, method, close=False).status is not None


@dataclass
class Received:
    status: int | None = None
    interim: tuple[int, ...] = ()
    body: bytes = b""
    complete: bool = False
    seconds: float = 0.0


async def through_parkway(answer: Wire, pieces: list[int], method: str, parser: str) -> Received:
    """``answer`` written by a loopback upstream in ``pieces``; what an h11 client of Parkway got."""
    config = make_config(upstream_first_byte_timeout=TIMEOUT, upstream_idle_timeout=TIMEOUT, http=parser)
    upstream = UpstreamClient(config.server)
    gateway = Gateway(config, upstream)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client_end, server_end = memory_stream_pair()
    conn = open_connection(server_end, config.server, "127.0.0.1")  # type: ignore[arg-type]
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    url = sign("http://parkway.test", f"http://127.0.0.1:{port}/v1/x", method=method)
    target = url.split("parkway.test", 1)[1]
    request = client.send(h11.Request(method=method, target=target, headers=[("host", "parkway.test")]))
    request += client.send(h11.EndOfMessage())
    got = Received()
    started = trio.current_time()

    async def serve_upstream() -> None:
        stream = await listeners[0].accept()
        async with stream:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some()
                if not data:
                    return
                buf += data
            at = 0
            for cut in [*pieces, len(answer.wire)]:
                if at < cut <= len(answer.wire):
                    await stream.send_all(answer.wire[at:cut])
                    await trio.lowlevel.checkpoint()
                    at = cut
            if not answer.close:
                await trio.sleep_forever()  # kept alive: the answer must go out without the close

    async def read_client() -> None:
        body = bytearray()
        interim: list[int] = []
        while True:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError:  # cut short
                return
            if event is h11.NEED_DATA:
                client.receive_data(await client_end.receive_some())
                continue
            if type(event) is h11.InformationalResponse:
                interim.append(event.status_code)
                got.interim = tuple(interim)
            elif type(event) is h11.Response:
                got.status = event.status_code
            elif type(event) is h11.Data:
                body += event.data
                got.body = bytes(body)
            elif type(event) is h11.EndOfMessage:
                got.complete = True
                got.seconds = trio.current_time() - started
                return
            else:
                return

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_upstream)
            await client_end.send_all(request)
            head = await conn.next_request(5)
            assert head is not None
            async with trio.open_nursery() as reading:
                reading.start_soon(read_client)
                await gateway.handle(head, conn)
                await trio.aclose_forcefully(server_end)  # what the server does once the exchange is over
            nursery.cancel_scope.cancel()
    for listener in listeners:
        await listener.aclose()
    await upstream.aclose()
    await trio.aclose_forcefully(client_end)
    return got


def check(verdict: Verdict, got: Received, method: str) -> None:
    if verdict.status is not None:
        assert (got.status, got.complete) == (verdict.status, True), f"expected a complete {verdict.status}, got {got}"
        assert got.body == (b"" if method == "HEAD" else verdict.body)
        assert got.seconds < PROMPT, f"the answer waited {got.seconds:.2f} s for the upstream to say more"
        assert [c for c in verdict.interim if c != 100] == [c for c in got.interim if c != 100], "1xx not forwarded"
        return
    if got.status in (502, 504):
        assert got.complete, f"a {got.status} must be a whole answer: {got}"
        return
    assert verdict.head is not None and got.status == verdict.head, f"expected a 502, got {got}"
    assert not got.complete, f"a failed upstream answer reached the client as if complete: {got}"


@st.composite
def examples(draw: st.DrawFn) -> tuple[str, Wire, list[int]]:
    method = draw(st.sampled_from(["GET", "GET", "POST", "HEAD"]))
    answer = draw(answers(method))
    n = len(answer.wire)
    pieces = sorted(set(draw(st.lists(st.integers(1, max(1, n)), max_size=8))))
    return method, answer, pieces


@pytest.mark.parametrize("parser", ["h11", "httptools"])  # [server] http: both faces' HTTP/1.1
@RELAY
@given(examples())
async def test_the_client_gets_what_h11_reads(parser: str, example: tuple[str, Wire, list[int]]) -> None:
    pytest.importorskip(parser)
    method, answer, pieces = example
    verdict = oracle(answer.oracle, method, answer.close)
    event("complete" if verdict.status is not None else "failed after the head" if verdict.head else "failed")
    got = await through_parkway(answer, pieces, method, parser)
    check(verdict, got, method)
