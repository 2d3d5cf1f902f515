"""The differential suite's machinery: scripted upstream behaviours, client request shapes, and
what RFC 9110/9112 require of a proxy between them (``tests/e2e/test_differential.py``).

One :class:`Behaviour` is one way an upstream can answer (the raw bytes, split and paused as
scripted, then keep-alive, close, reset or silence). Each behaviour listens on a loopback port
of its own, so a proxy's pool of kept-alive connections to it is only ever used by that
behaviour's cases. A :data:`SHAPES` entry is one way a client asks (GET, HEAD, POST with a
length or chunked, HTTP/1.0, two requests on one connection, a pipelined follow-up, a
signed-body POST). Every (behaviour, shape) pair is played through each target (Parkway on
the epoll driver, on the portable driver, and nginx) and gives a :class:`CaseRun`: what the
client received, parsed by a real h11 client, and what the upstream received.

What the client must get is computed, not hand-written: :func:`oracle` feeds the scripted
bytes to an ``h11.Connection(h11.CLIENT)`` (RFC 9112's parser) and says "this answer, complete"
or "the upstream failed (after this head)". A behaviour overrides it only where h11 is stricter
than the RFC. :func:`violations` then checks a run against it and against the rules a proxy
must keep whatever the upstream does (RFC 9110 §9.2.2, §15.2; RFC 9112 §6, §9.6).
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import h11
import trio

# --- behaviours --------------------------------------------------------------------------------

Then = Literal["keep", "close", "reset", "silent", "drain_close", "stop_reading"]


@dataclass(frozen=True)
class Expect:
    """What a client must receive. ``status`` None: the upstream failed; the client gets a framed
    502/504, or (``head`` given) that head followed by a body the proxy cut short."""

    status: int | None
    body: bytes = b""
    interim: tuple[int, ...] = ()  # 1xx codes the upstream sent before the final answer
    head: int | None = None  # for a failure after the upstream's head: its status
    slow: bool = False  # the proxy learns of the failure only from its own timeout


@dataclass(frozen=True)
class Behaviour:
    """One scripted upstream answer (see the module docstring)."""

    name: str
    wire: bytes  # what a GET (or POST) gets
    then: Then = "keep"
    head_wire: bytes | None = None  # what a HEAD gets; default: ``wire`` up to the final head's end
    read_body: bool = True  # read the request body before answering (False: an early answer)
    writes: int = 1  # the answer split over this many writes
    split_at: tuple[int, ...] = ()  # ... or at these offsets
    pause: tuple[int, float] | None = None  # (offset, seconds): a pause after ``offset`` bytes
    on_reuse: Behaviour | None = None  # the answer to the 2nd, 3rd ... request on one upstream connection
    big_body: bool = False  # POST shapes send 4 MiB instead of 1 KiB
    expect: Expect | None = None  # overrides the oracle (where h11 is stricter than the RFC)
    either: Expect | None = None  # a second acceptable outcome (timing the RFC leaves open)
    head_first: bool = False  # the head must reach the client before the body does (no held head)
    absent: tuple[bytes, ...] = ()  # response header (or trailer) fields that must not reach the client
    present: tuple[bytes, ...] = ()  # ... and ones that must
    harm: str | None = None  # issue 18's harm this behaviour showed before the fixes (the report counts them)
    still_harmed: str | None = None  # a harm not fixed yet: its cases are strict xfails naming it
    deviation: str | None = None  # Parkway differs from nginx on purpose: the docs/proxying.md entry
    nginx_wrong: str | None = None  # nginx breaks the RFC here: which rule
    nginx_differs: str | None = None  # nginx differs within the RFC (its limits, its choices)
    id: str = ""

    def __repr__(self) -> str:  # pytest shows a failed test's arguments: not a 2 MiB answer
        return f"Behaviour({self.id or self.name!r})"

    def answer_for(self, method: str) -> bytes:
        if method != "HEAD":
            return self.wire
        if self.head_wire is not None:
            return self.head_wire
        end = final_head_end(self.wire)
        return self.wire if end is None else self.wire[:end]

    def closes(self) -> bool:
        return self.then in ("close", "reset", "drain_close")


def final_head_end(wire: bytes) -> int | None:
    """Offset just after the final (non-1xx) response head in ``wire``, None if there is none."""
    pos = 0
    while True:
        end = wire.find(b"\r\n\r\n", pos)
        if end < 0:
            return None
        status = wire[pos + 9 : pos + 12]
        if not (status[:1] == b"1" and wire[pos : pos + 5] == b"HTTP/"):
            return end + 4
        pos = end + 4


# --- the oracle --------------------------------------------------------------------------------


def oracle(wire: bytes, method: str, closes: bool) -> Expect:
    """What RFC 9112's parser (h11) says the upstream answered to ``method``."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=65536)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "upstream")]))
    conn.send(h11.EndOfMessage())
    if wire:  # b"" would tell h11 the connection closed
        conn.receive_data(wire)
    if closes:
        conn.receive_data(b"")
    interim: list[int] = []
    status: int | None = None
    body = bytearray()
    try:
        while True:
            event = conn.next_event()
            if type(event) is h11.InformationalResponse:
                interim.append(event.status_code)
            elif type(event) is h11.Response:
                status = event.status_code
            elif type(event) is h11.Data:
                body += event.data
            elif type(event) is h11.EndOfMessage:
                assert status is not None
                return Expect(status, bytes(body), tuple(interim))
            elif event is h11.NEED_DATA:  # the upstream stays silent: the proxy's timeout ends it
                return Expect(None, interim=tuple(interim), head=status, slow=True)
            else:
                return Expect(None, interim=tuple(interim), head=status)
    except h11.RemoteProtocolError:
        return Expect(None, interim=tuple(interim), head=status)


def expected(b: Behaviour, method: str, n_on_conn: int = 0) -> Expect:
    if b.expect is not None:
        return b.expect if method != "HEAD" else Expect(b.expect.status, b"", b.expect.interim, b.expect.head)
    return oracle(b.answer_for(method), method, b.closes())


# --- the scripted upstream ---------------------------------------------------------------------


@dataclass
class Received:
    """One request as the upstream read it."""

    method: str
    path: str
    connection: int
    n_on_conn: int
    body: int = 0  # bytes of body read
    complete: bool = False  # the whole body was read


class _Reader:
    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = b""

    async def fill(self) -> bool:
        data = await self.stream.receive_some(1 << 16)
        self.buf += data
        return bool(data)

    async def until(self, marker: bytes, limit: int = 1 << 20) -> bytes | None:
        while marker not in self.buf:
            if len(self.buf) > limit or not await self.fill():
                return None
        out, _, self.buf = self.buf.partition(marker)
        return out

    async def exactly(self, n: int) -> bool:
        while len(self.buf) < n:
            if not await self.fill():
                return False
        self.buf = self.buf[n:]
        return True


@dataclass
class BehaviourServer:
    """One behaviour on its own port: answers every request as scripted, records what it read."""

    behaviour: Behaviour
    records: dict[str, list[Received]]
    port: int = 0
    connections: int = 0

    async def serve(self, *, task_status: trio.TaskStatus[BehaviourServer] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=128)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        reader = _Reader(stream)
        try:
            n = 0
            while True:
                head = await reader.until(b"\r\n\r\n")
                if head is None:
                    return
                lines = head.split(b"\r\n")
                method, path = (x.decode("latin-1") for x in lines[0].split(b" ")[:2])
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip().lower()
                got = Received(method, path, number, n)
                self.records.setdefault(path, []).append(got)
                b = self.behaviour if n == 0 or self.behaviour.on_reuse is None else self.behaviour.on_reuse
                if b.read_body and not await _read_body(reader, headers, got):
                    return
                then = await _play(stream, b, _answer(b, method))
                if then in ("close", "reset"):
                    if then == "reset":
                        stream.socket.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                        )
                    return
                if then == "drain_close":
                    await stream.send_eof()
                    while await reader.fill():
                        reader.buf = b""
                    return
                if then in ("silent", "stop_reading"):
                    await trio.sleep_forever()
                if not b.read_body:  # an early answer kept alive: the body is still to be read
                    if not await _read_body(reader, headers, got):
                        return
                n += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def _read_body(reader: _Reader, headers: dict[bytes, bytes], got: Received) -> bool:
    if b"chunked" in headers.get(b"transfer-encoding", b""):
        while True:
            line = await reader.until(b"\r\n")
            if line is None:
                return False
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := await reader.until(b"\r\n")) not in (b"", None):
                    pass
                got.complete = trailer is not None
                return got.complete
            if not await reader.exactly(size + 2):
                return False
            got.body += size
    length = int(headers.get(b"content-length", b"0") or b"0")
    while len(reader.buf) < length:
        got.body = len(reader.buf)
        if not await reader.fill():
            return False
    reader.buf = reader.buf[length:]
    got.body, got.complete = length, True
    return True


def _answer(b: Behaviour, method: str) -> bytes:
    """What the server writes for ``method``. A HEAD's answer is whole at its head, so a proxy may
    pool the connection after it (RFC 9112 §9.3); a behaviour that then goes silent would stall
    whichever request of another shape took that connection next, or not, by timing (seen under
    load as a 504 after the first-byte timeout). Such a HEAD answer says ``Connection: close``: the
    behaviour is about silence in the middle of an answer, which a HEAD's cannot have."""
    wire = b.answer_for(method)
    if method != "HEAD" or b.then not in ("silent", "stop_reading") or final_head_end(wire) != len(wire):
        return wire
    if b"\nconnection: close" in wire.lower():
        return wire
    blank = b"\r\n" if wire.endswith(b"\r\n") else b"\n"  # the final head's empty line
    return wire[: -len(blank)] + b"Connection: close" + blank + blank


async def _play(stream: trio.SocketStream, b: Behaviour, wire: bytes) -> Then:
    cuts = set(b.split_at)
    if b.writes > 1:
        step = max(1, len(wire) // b.writes)
        cuts |= set(range(step, len(wire), step))
    if b.pause is not None:
        cuts.add(b.pause[0])
    pos = 0
    for cut in sorted(c for c in cuts if 0 < c < len(wire)) + [len(wire)]:
        await stream.send_all(wire[pos:cut])
        if b.pause is not None and cut == b.pause[0]:
            await trio.sleep(b.pause[1])
        else:
            await trio.lowlevel.checkpoint()  # a segment of its own (TCP_NODELAY); the proxy may read several at once
        pos = cut
    return b.then


# --- client shapes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """One request of a shape: how it is framed."""

    method: str
    body: Literal["none", "length", "chunked", "signed"] = "none"
    http10: bool = False
    close: bool = False  # sends Connection: close (the proxy must close after the answer)


@dataclass(frozen=True)
class Shape:
    name: str
    asks: tuple[Ask, ...]
    mode: Literal["one", "sequential", "pipelined"] = "one"


SHAPES: tuple[Shape, ...] = (
    Shape("get", (Ask("GET"),)),
    Shape("head", (Ask("HEAD", close=True),)),
    Shape("post", (Ask("POST", "length"),)),
    Shape("post_chunked", (Ask("POST", "chunked"),)),
    Shape("http10", (Ask("GET", http10=True),)),
    Shape("two", (Ask("GET"), Ask("GET")), "sequential"),
    Shape("pipelined", (Ask("GET"), Ask("GET")), "pipelined"),
    Shape("signed_post", (Ask("POST", "signed"),)),
)
SHAPE_NAMES = tuple(s.name for s in SHAPES)
SMALL_BODY = b'{"model":"m","input":"' + b"x" * 1000 + b'"}'
BIG_BODY = b"y" * (4 << 20)


# --- what the client received ------------------------------------------------------------------

Kind = Literal["answer", "cut", "closed", "garbage", "hang", "unsent"]


@dataclass
class Outcome:
    """One response as the client's h11 parser saw it."""

    kind: Kind = "unsent"
    status: int | None = None
    interim: tuple[int, ...] = ()
    headers: tuple[tuple[bytes, bytes], ...] = ()
    trailers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    head_at: float | None = None  # seconds from the request to the head
    body_at: float | None = None  # ... to the first body byte
    closed: bool = False  # the proxy closed the connection after this answer
    stray: int = 0  # bytes after a complete answer the client did not ask for
    detail: str = ""

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    def signature(self) -> tuple[object, ...]:
        """What two proxies must agree on to count as "the same" for this answer."""
        if self.kind == "answer" and self.status in (502, 504):
            return ("error",)
        if self.kind == "answer":
            return ("answer", self.status, hashlib.sha256(self.body).hexdigest()[:12], self.interim)
        if self.kind == "cut":
            return ("cut", self.status)
        return (self.kind,)

    def brief(self) -> str:
        what = f"{self.kind} {self.status or ''}".strip()
        if self.interim:
            what += f" after {list(self.interim)}"
        if self.kind in ("answer", "cut"):
            what += f" body={self.body[:40]!r}{'...' if len(self.body) > 40 else ''}({len(self.body)})"
        if self.stray:
            what += f" +{self.stray} stray"
        return what + (f" [{self.detail}]" if self.detail else "")


class ResponseReader:
    """Consecutive responses from one client connection, each parsed by its own h11 client."""

    def __init__(self, stream: trio.SocketStream, bound: float):
        self.stream = stream
        self.leftover = b""
        self.eof = False
        self.bound = bound
        self.scope = trio.CancelScope()  # a hang: no byte for ``bound`` seconds

    def _progress(self) -> None:
        self.scope.deadline = trio.current_time() + self.bound

    async def _more(self) -> bytes:
        if self.eof:
            return b""
        try:
            data = await self.stream.receive_some(1 << 16)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.eof = True
        self._progress()
        return data

    async def read(self, ask: Ask, started: float, out: Outcome) -> None:
        """Fill ``out`` with the response to ``ask`` (partially, if cancelled)."""
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)  # see what the proxy sent
        # h11 sends only HTTP/1.1; the framing of the answer is read the same way for a 1.0 request.
        conn.send(h11.Request(method=ask.method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        data, self.leftover = self.leftover, b""
        if data:  # b"" would tell h11 the connection closed
            conn.receive_data(data)
        body = bytearray()
        interim: list[int] = []
        got_any = bool(data)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                out.kind = "cut" if out.status is not None else ("garbage" if got_any else "closed")
                out.detail = str(exc)[:80]
                out.body = bytes(body)
                out.closed = self.eof
                return
            if event is h11.NEED_DATA:
                more = await self._more()
                got_any = got_any or bool(more)
                conn.receive_data(more)
                continue
            if type(event) is h11.InformationalResponse:
                interim.append(event.status_code)
                out.interim = tuple(interim)
            elif type(event) is h11.Response:
                out.status = event.status_code
                out.headers = tuple(event.headers)
                out.head_at = trio.current_time() - started
                out.kind = "cut"  # until its end arrives
            elif type(event) is h11.Data:
                if out.body_at is None:
                    out.body_at = trio.current_time() - started
                body += event.data
                out.body = bytes(body)
            elif type(event) is h11.EndOfMessage:
                out.kind = "answer"
                out.body = bytes(body)
                out.trailers = tuple(event.headers)
                self.leftover = conn.trailing_data[0]
                if conn.trailing_data[1]:
                    self.eof = True
                return
            elif type(event) is h11.ConnectionClosed:
                out.kind = "closed"
                out.closed = True
                return

    async def wait_close(self) -> tuple[bool, int]:
        """Read to the end of the connection: (closed, stray bytes seen before the close)."""
        stray = len(self.leftover)
        self.leftover = b""
        while data := await self._more():
            stray += len(data)
        return True, stray


# --- a case run --------------------------------------------------------------------------------


@dataclass
class CaseRun:
    """One (behaviour, shape) through one target."""

    target: str
    outcomes: list[Outcome] = field(default_factory=list)
    received: dict[str, list[Received]] = field(default_factory=dict)
    seconds: float = 0.0

    def __repr__(self) -> str:
        return f"CaseRun({self.brief()!r})"

    def brief(self) -> str:
        ups = {p.rsplit("/", 1)[-1]: [r.method for r in rs] for p, rs in self.received.items()}
        return f"{self.target}: " + " | ".join(o.brief() for o in self.outcomes) + f"  upstream got {ups}"


Requester = Callable[[Ask, int], tuple[str, bytes]]  # (ask, index) -> (request bytes, path)


def request_bytes(ask: Ask, target: str, host: str, body: bytes, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The raw request: framed by hand so HTTP/1.0 and chunked bodies are exactly as asked."""
    version = "HTTP/1.0" if ask.http10 else "HTTP/1.1"
    lines = [f"{ask.method} {target} {version}", f"Host: {host}", *(f"{n}: {v}" for n, v in extra)]
    if ask.close:
        lines.append("Connection: close")
    payload = b""
    if ask.body in ("length", "signed"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        payload = body
    elif ask.body == "chunked":
        lines.append("Transfer-Encoding: chunked")
        size = max(1, len(body) // 3)
        pieces = [body[i : i + size] for i in range(0, len(body), size)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def run_shape(
    port: int,
    shape: Shape,
    make: Callable[[Ask, int], bytes],
    bound: float,
) -> list[Outcome]:
    """Play ``shape`` against 127.0.0.1:``port``; every response bounded by ``bound`` seconds."""
    outcomes = [Outcome() for _ in shape.asks]
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError as exc:
        outcomes[0].kind, outcomes[0].detail = "closed", f"connect: {exc}"
        return outcomes
    reader = ResponseReader(stream, bound)
    try:
        async with trio.open_nursery() as nursery:
            requests = [make(ask, i) for i, ask in enumerate(shape.asks)]

            async def send(data: bytes) -> None:
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # answered early and closed: what it said is still there to read

            if shape.mode == "pipelined":
                nursery.start_soon(send, b"".join(requests))
            for i, ask in enumerate(shape.asks):
                out = outcomes[i]
                if shape.mode == "sequential" and i > 0:
                    prev = outcomes[i - 1]
                    if prev.kind != "answer" or reader.eof or _says_close(prev):
                        break  # nothing more may be asked on this connection
                started = trio.current_time()
                if shape.mode != "pipelined":
                    nursery.start_soon(send, requests[i])
                with trio.CancelScope() as scope:
                    reader.scope = scope
                    reader._progress()
                    await reader.read(ask, started, out)
                    if ask.http10 or ask.close:
                        if out.kind == "answer":
                            out.closed, out.stray = await reader.wait_close()
                if scope.cancelled_caught:
                    if out.kind == "answer":
                        out.detail = "connection not closed"
                    else:
                        out.kind, out.detail = "hang", f"nothing for {bound:g} s ({out.kind} so far)"
                    break
                if out.kind != "answer" or reader.eof:
                    break
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)
    return outcomes


def _says_close(o: Outcome) -> bool:
    value = o.header(b"connection") or b""
    return b"close" in value.lower()


# --- what a proxy must do ----------------------------------------------------------------------


def violations(b: Behaviour, shape: Shape, run: CaseRun) -> list[str]:
    """Every RFC rule (and issue 18 promise) ``run`` breaks; empty when the proxy did its job."""
    found: list[str] = []
    for i, (ask, out) in enumerate(zip(shape.asks, run.outcomes, strict=True)):
        tag = f"{shape.name}[{i}] {ask.method}"
        if out.kind == "closed" and i > 0 and not out.detail.startswith("connect"):
            continue  # RFC 9112 §9.3.1: a kept-alive connection may close before the next request is read
        if out.kind == "unsent":
            if shape.mode == "pipelined" and i > 0 and run.outcomes[0].closed:
                continue  # the connection closed after the first answer: the follow-up was never read
            if i > 0:
                continue  # the first answer closed the connection: nothing more was asked
            found.append(f"{tag}: nothing sent")
            continue
        if out.kind == "hang":
            found.append(f"{tag}: hang ({out.detail})")
            continue
        exp = expected(b, ask.method)
        ok = _matches(exp, ask, out)
        ok = ok or stale_pool_race(run, i, ask)
        if not ok and b.either is not None:
            ok = _matches(b.either if ask.method != "HEAD" else Expect(b.either.status, b"", b.either.interim,
                                                                         b.either.head), ask, out)  # fmt: skip
        if not ok:
            found.append(f"{tag}: expected {_describe(exp)}, got {out.brief()}")
        if out.kind == "answer" and out.detail == "connection not closed":
            found.append(
                f"{tag}: connection left open after an answer to a request that asked to close (RFC 9112 §9.6)"
            )
        if ask.method == "HEAD" and (out.body or out.stray):
            found.append(f"{tag}: a body on a HEAD answer (RFC 9110 §9.3.2)")
        if ask.http10:
            if out.interim:
                found.append(f"{tag}: 1xx sent to an HTTP/1.0 client (RFC 9110 §15.2)")
            if b"chunked" in (out.header(b"transfer-encoding") or b""):
                found.append(f"{tag}: chunked sent to an HTTP/1.0 client (RFC 9112 §6.1)")
        elif out.kind == "answer" and exp.status is not None and out.status == exp.status:
            missing = [c for c in exp.interim if c != 100 and c not in out.interim]
            if missing:
                found.append(f"{tag}: 1xx {missing} not forwarded (RFC 9110 §15.2)")
        if out.kind == "answer" and out.status not in (502, 504):
            for name in b.absent:
                if out.header(name) is not None or any(n == name for n, _ in out.trailers):
                    found.append(f"{tag}: field {name.decode()} passed (hop-by-hop, or Parkway's header policy)")
            for name in b.present:
                if out.header(name) is None:
                    found.append(f"{tag}: header {name.decode()} lost")
        if b.head_first and b.pause and out.head_at is not None and out.body_at is not None:
            # The upstream paused between head and body: the client must see that gap too.
            if out.body_at - out.head_at < b.pause[1] / 2:
                found.append(f"{tag}: head held back until the body came ({out.body_at - out.head_at:.2f} s apart)")
    for path, reqs in run.received.items():
        posts = [r for r in reqs if r.method == "POST"]
        if len(posts) > 1:
            found.append(f"{path}: the upstream received the POST {len(posts)} times (RFC 9110 §9.2.2)")
    return found


def stale_pool_race(run: CaseRun, index: int, ask: Ask) -> bool:
    """A pooled connection the upstream closed just as this POST went out on it: the POST cannot
    be retried (RFC 9112 §9.3.1), so a 502 is right, and the upstream never saw the request."""
    out = run.outcomes[index]
    reached = any(path.endswith(f"/{index}") for path in run.received)
    return ask.method == "POST" and out.kind == "answer" and out.status == 502 and not reached


def same_answers(shape: Shape, a: CaseRun, b: CaseRun) -> bool:
    """Whether two targets gave the client the same answers (a stale-pool race is nobody's answer)."""
    return all(
        x.signature() == y.signature() or stale_pool_race(a, i, ask) or stale_pool_race(b, i, ask)
        for i, (ask, x, y) in enumerate(zip(shape.asks, a.outcomes, b.outcomes, strict=True))
    )


def _matches(exp: Expect, ask: Ask, out: Outcome) -> bool:
    if exp.status is not None:
        body = b"" if ask.method == "HEAD" else exp.body
        return out.kind == "answer" and out.status == exp.status and out.body == body
    if out.kind == "answer" and out.status in (502, 504):
        return True
    if exp.head is not None and out.status == exp.head:
        if out.kind == "cut":
            return True
        # HTTP/1.0 has no end of body but the close: a cut answer without a length looks whole.
        if out.kind == "answer" and ask.http10 and out.header(b"content-length") is None:
            return True
    return False


def _describe(exp: Expect) -> str:
    if exp.status is not None:
        return f"answer {exp.status} body={exp.body[:40]!r}({len(exp.body)})" + (
            f" after {list(exp.interim)}" if exp.interim else ""
        )
    return "a framed 502/504" + (f" or {exp.head} cut short" if exp.head else "")
