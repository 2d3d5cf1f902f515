"""The load generator: one process, one thread, raw epoll, so 10,000 streams cost little.

Three modes, each printing ``STAT {json}`` lines while it runs and one ``RESULT {json}`` line:

* ``stream``: open ``--streams`` connections at ``--rate`` per second, POST one streaming
  request on each and read the chunked SSE answer to its end, counting events (``\\n\\n``
  in the de-chunked body). A stream is complete when the chunked terminator arrived with
  exactly ``--expect-events`` events and status 200; anything else is counted as an error
  by kind. Time to first event is measured from the request write (the connection is open).
  With ``--interval-ms`` (the upstream's pace) it also measures each later event's lateness:
  its arrival minus its place on the stream's schedule (the upstream sends event ``k`` at
  ``start + k × interval``; ``start`` is estimated as the stream's earliest event, so a
  lateness is relay delay beyond the stream's best one), overall and for the events that
  arrived while some stream still waited for its first event (the ramp: how a burst of
  set-ups delays the streams already parked).
* ``small``: ``--clients`` keep-alive connections each sending one small request after the
  other for ``--seconds`` (after ``--warmup``): requests per second and latency percentiles.
  With ``--signal-pid PID`` the measured window is fenced for a profiler in that process
  (``loadtest.calls``): at each edge the clients send nothing new until every answer is in,
  then, in a quiet pause, the process gets SIGUSR1 (start) or SIGUSR2 (stop); so the profile
  holds exactly the ``counted`` requests.
* ``latency``: one connection, ``--requests`` sequential requests: latency percentiles.

Everything is bounded: a ``--deadline`` ends the run (unfinished streams count as errors).
Loopback only.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import signal
import socket
import sys
import time

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP
FENCE_PAUSE = 0.1  # seconds of quiet on each side of a profiler's signal (--signal-pid)


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "n": 0}
    values = sorted(values)
    n = len(values)

    def at(q: float) -> float:
        return values[min(n - 1, int(q * n))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": values[-1], "n": n}


def request_bytes(host: str, port: int, target: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: */*\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1") + body


def extra_headers(args: argparse.Namespace) -> str:
    return "".join(f"{h}\r\n" for h in args.header)


class Response:
    """Incremental HTTP/1.1 response reader: head, then a chunked or Content-Length body.

    ``feed`` returns True once the response is complete. ``events`` counts ``\\n\\n`` in
    the de-chunked body (SSE event ends), across chunk and read boundaries.
    """

    __slots__ = ("buf", "status", "chunked", "left", "skip", "last", "events", "done", "body_bytes", "error")

    def __init__(self) -> None:
        self.buf = b""
        self.status = 0
        self.chunked = False
        self.left = -1  # -1: head not parsed; then data bytes left in this chunk / the body
        self.skip = 0  # CRLF after a chunk's data
        self.last = b""
        self.events = 0
        self.done = False
        self.body_bytes = 0
        self.error: str | None = None

    def feed(self, data: bytes) -> bool:
        if self.left < 0:
            data = self.buf + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return False
            head = data[:end].lower()
            self.buf = b""
            try:
                self.status = int(head[9:12])
            except ValueError:
                self.error = "bad_status_line"
                return True
            self.chunked = b"\r\ntransfer-encoding: chunked" in head
            self.left = 0
            if not self.chunked:
                i = head.find(b"\r\ncontent-length:")
                if i < 0:
                    self.error = "no_length"
                    return True
                j = head.find(b"\r\n", i + 2)
                self.left = int(head[i + 17 : j if j >= 0 else len(head)])
            data = data[end + 4 :]
            if not self.chunked:
                return self._plain(data)
        elif not self.chunked:
            return self._plain(data)
        return self._chunks(data)

    def _plain(self, data: bytes) -> bool:
        self.left -= len(data)
        self.body_bytes += len(data)
        if self.left <= 0:
            self.done = True
            if self.left < 0:
                self.error = "extra_bytes"
        return self.done

    def _chunks(self, data: bytes) -> bool:
        if self.buf:
            data, self.buf = self.buf + data, b""
        pos, n = 0, len(data)
        while pos < n:
            if self.left:
                end = min(n, pos + self.left)
                seg = data[pos:end]
                self.events += (self.last + seg).count(b"\n\n")
                self.last = seg[-1:]
                self.body_bytes += end - pos
                self.left -= end - pos
                pos = end
                if not self.left:
                    self.skip = 2
            elif self.skip:
                k = min(self.skip, n - pos)
                pos += k
                self.skip -= k
            else:
                i = data.find(b"\r\n", pos)
                if i < 0:
                    self.buf = data[pos:]
                    return False
                try:
                    size = int(data[pos:i].split(b";")[0], 16)
                except ValueError:
                    self.error = "bad_chunk"
                    return True
                pos = i + 2
                if size == 0:
                    self.done = True  # trailers (none are sent here) are not awaited
                    if data.find(b"\r\n", pos) != pos and n > pos:
                        self.error = "trailer"
                    return True
                self.left = size
        return False


class Stream:
    __slots__ = ("sock", "fd", "t_start", "t_sent", "t_first", "t_done", "resp", "state", "arrivals")

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.t_start = now
        self.t_sent = 0.0
        self.t_first = 0.0
        self.t_done = 0.0
        self.resp = Response()
        self.state = "connecting"
        self.arrivals: list[tuple[float, int]] = []  # (time, events received so far) per read with events


def run_streams(args: argparse.Namespace) -> dict:
    body = args.body.encode()
    request = request_bytes(args.host, args.port, args.target, body, extra_headers(args))
    epoll = select.epoll()
    streams: dict[int, Stream] = {}
    errors: dict[str, int] = {}
    ttfe: list[float] = []
    durations: list[float] = []
    connect_times: list[float] = []
    started = completed = events = 0
    t0 = time.monotonic()
    deadline = t0 + args.deadline
    next_stat = t0
    t_all_open = t_first_done = None
    open_now = max_open = 0
    interval = args.interval_ms / 1000
    late: list[tuple[float, float]] = []  # (arrival, lateness) of every event after a stream's first

    def lateness(s: Stream) -> None:
        """Lateness of this stream's events after its first (see the module docstring)."""
        if not interval or len(s.arrivals) < 2:
            return
        # A read bringing events k0+1..k is timed at once: its last event is the least late.
        origin = min(t - (k - 1) * interval for t, k in s.arrivals)
        before = s.arrivals[0][1]
        for t, k in s.arrivals[1:]:
            late.extend((t, t - (j * interval) - origin) for j in range(before, k))
            before = k

    def fail(s: Stream, kind: str) -> None:
        nonlocal open_now
        errors[kind] = errors.get(kind, 0) + 1
        finish(s)

    def finish(s: Stream) -> None:
        nonlocal open_now
        if s.state == "receiving" and s.t_first:
            open_now -= 1
        lateness(s)
        s.arrivals = []
        s.state = "closed"
        del streams[s.fd]
        try:
            epoll.unregister(s.fd)
        except OSError:
            pass
        s.sock.close()

    while True:
        now = time.monotonic()
        target = min(args.streams, int((now - t0) * args.rate) + 1)
        while started < target:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((args.host, args.port))
            started += 1
            s = Stream(sock, now)
            if err not in (0, errno.EINPROGRESS):
                errors["connect"] = errors.get("connect", 0) + 1
                sock.close()
                continue
            streams[s.fd] = s
            epoll.register(s.fd, EPOLLOUT)
        if now >= next_stat:
            next_stat = now + args.stat_interval
            print(
                "STAT "
                + json.dumps(
                    {
                        "t": now - t0,
                        "started": started,
                        "open": open_now,
                        "completed": completed,
                        "events": events,
                        "errors": sum(errors.values()),
                    }
                ),
                flush=True,
            )
        if started >= args.streams and not streams:
            break
        if now > deadline:
            for s in list(streams.values()):
                fail(s, "deadline_" + s.state)
            break
        timeout = 0.002 if started < args.streams else min(0.2, max(0.0, next_stat - now))
        for fd, _mask in epoll.poll(timeout, 4096):
            s = streams.get(fd)
            if s is None:
                continue
            now = time.monotonic()
            if s.state == "connecting":
                err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(s, "connect")
                    continue
                connect_times.append(now - s.t_start)
                try:
                    s.sock.send(request)  # a few hundred bytes: the kernel takes them whole
                except OSError:
                    fail(s, "send")
                    continue
                s.t_sent = now
                s.state = "receiving"
                epoll.modify(fd, EPOLLIN)
                continue
            try:
                data = s.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                fail(s, "closed_early" if s.resp.status in (0, 200) else f"status_{s.resp.status}")
                continue
            before = s.resp.events
            finished = s.resp.feed(data)
            got = s.resp.events - before
            if got:
                events += got
                if interval:
                    s.arrivals.append((now, s.resp.events))
                if not s.t_first:
                    s.t_first = now
                    ttfe.append(now - s.t_sent)
                    open_now += 1
                    max_open = max(max_open, open_now)
                    if t_all_open is None and len(ttfe) >= args.streams:
                        t_all_open = now - t0
            if finished:
                r = s.resp
                if r.error:
                    fail(s, r.error)
                elif r.status != 200:
                    fail(s, f"status_{r.status}")
                elif r.events != args.expect_events:
                    fail(s, "wrong_event_count")
                else:
                    completed += 1
                    durations.append(now - s.t_sent)
                    if t_first_done is None:
                        t_first_done = now - t0
                    finish(s)
    t_end = time.monotonic() - t0
    return {
        "mode": "stream",
        "streams": args.streams,
        "completed": completed,
        "errors": errors,
        "error_count": sum(errors.values()),
        "events": events,
        "ttfe_s": percentiles(ttfe),
        "connect_s": percentiles(connect_times),
        "duration_s": percentiles(durations),
        "max_open": max_open,
        "lateness_s": percentiles([x for _, x in late]),
        # Events that arrived while some stream still waited for its first event.
        "ramp_lateness_s": percentiles([x for t, x in late if t_all_open is None or t - t0 <= t_all_open]),
        "t_all_open": t_all_open,
        "t_first_done": t_first_done,
        "t_end": t_end,
    }


class Client:
    __slots__ = ("sock", "fd", "t_sent", "resp")


def run_small(args: argparse.Namespace) -> dict:
    body = args.body.encode()
    request = request_bytes(args.host, args.port, args.target, body, extra_headers(args))
    epoll = select.epoll()
    clients: dict[int, Client] = {}
    errors: dict[str, int] = {}
    latencies: list[float] = []
    for _ in range(args.clients):
        c = Client()
        c.sock = socket.create_connection((args.host, args.port), timeout=5)
        c.sock.setblocking(False)
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.fd = c.sock.fileno()
        clients[c.fd] = c
        epoll.register(c.fd, EPOLLIN)
    t0 = time.monotonic()
    fenced = bool(args.signal_pid)
    # Fenced, the window opens once the warm-up's answers are all in (see fence()).
    measure_from = float("inf") if fenced else t0 + args.warmup
    measure_to = measure_from + args.seconds
    counted = total = in_flight = 0
    holding = False  # fenced, at an edge of the window: no new request until every answer is in
    next_stat = t0

    def send(c: Client, now: float) -> None:
        c.resp = Response()
        c.t_sent = now
        c.sock.send(request)

    def fence(sig: int) -> None:
        """Every answer is in: the signal in a quiet pause (its handler has run before traffic resumes)."""
        time.sleep(FENCE_PAUSE)
        os.kill(args.signal_pid, sig)
        time.sleep(FENCE_PAUSE)

    for c in clients.values():
        send(c, t0)
        in_flight += 1
    while clients:
        now = time.monotonic()
        if fenced:
            if holding and not in_flight:
                holding = False
                if measure_from == float("inf"):  # the warm-up is over: the profile and the window start
                    fence(signal.SIGUSR1)
                    measure_from = time.monotonic()
                    measure_to = measure_from + args.seconds
                    for c in clients.values():
                        send(c, measure_from)
                        in_flight += 1
                    continue
                fence(signal.SIGUSR2)
                break
            if not holding and (now >= measure_to or (measure_from == float("inf") and now >= t0 + args.warmup)):
                holding = True
        elif now >= measure_to:
            break
        if now >= next_stat:
            next_stat = now + args.stat_interval
            print(
                "STAT "
                + json.dumps({"t": now - t0, "requests": total, "counted": counted, "errors": sum(errors.values())}),
                flush=True,
            )
        for fd, _mask in epoll.poll(0.2, 1024):
            c = clients[fd]
            try:
                data = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            now = time.monotonic()
            if not data:
                if not (c.resp.done or c.resp.error):
                    in_flight -= 1
                errors["closed"] = errors.get("closed", 0) + 1
                epoll.unregister(fd)
                c.sock.close()
                del clients[fd]
                continue
            if not c.resp.feed(data):
                continue
            total += 1
            in_flight -= 1
            if c.resp.error or c.resp.status != 200:
                kind = c.resp.error or f"status_{c.resp.status}"
                errors[kind] = errors.get(kind, 0) + 1
            elif measure_from <= c.t_sent and (now <= measure_to or fenced):
                counted += 1
                latencies.append(now - c.t_sent)
            if holding:
                continue
            try:
                send(c, now)
                in_flight += 1
            except OSError:
                errors["send"] = errors.get("send", 0) + 1
    for c in clients.values():
        c.sock.close()
    return {
        "mode": "small",
        "clients": args.clients,
        "seconds": args.seconds,
        "requests": total,
        "counted": counted,
        "rps": counted / args.seconds,
        "errors": errors,
        "error_count": sum(errors.values()),
        "latency_s": percentiles(latencies),
    }


def run_latency(args: argparse.Namespace) -> dict:
    request = request_bytes(args.host, args.port, args.target, args.body.encode(), extra_headers(args))
    sock = socket.create_connection((args.host, args.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + args.deadline
    for i in range(args.warmup_requests + args.requests):
        if time.monotonic() > deadline:
            errors["deadline"] = errors.get("deadline", 0) + 1
            break
        resp = Response()
        t = time.perf_counter()
        sock.sendall(request)
        while True:
            data = sock.recv(65536)
            if not data:
                errors["closed"] = errors.get("closed", 0) + 1
                break
            if resp.feed(data):
                break
        elapsed = time.perf_counter() - t
        if not data:
            break
        if resp.error or resp.status != 200:
            kind = resp.error or f"status_{resp.status}"
            errors[kind] = errors.get(kind, 0) + 1
        elif i >= args.warmup_requests:
            latencies.append(elapsed)
    sock.close()
    return {
        "mode": "latency",
        "requests": len(latencies),
        "errors": errors,
        "error_count": sum(errors.values()),
        "latency_s": percentiles(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["stream", "small", "latency"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="request-target: path and query")
    parser.add_argument("--header", action="append", default=[], metavar="'Name: value'")
    parser.add_argument(
        "--body", default='{"model":"mock-gpt","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    )
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rate", type=float, default=2000, help="new streams per second")
    parser.add_argument("--expect-events", type=int, default=100)
    parser.add_argument(
        "--interval-ms", type=float, default=0.0, help="the upstream's event pace: measure lateness (0: do not)"
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup-requests", type=int, default=200)
    parser.add_argument("--deadline", type=float, default=300, help="hard limit on the run, seconds")
    parser.add_argument("--stat-interval", type=float, default=0.5)
    parser.add_argument(
        "--signal-pid",
        type=int,
        default=0,
        help="small: fence the measured window for a profiler in this process (SIGUSR1 at its start, "
        "SIGUSR2 at its end, each once every answer is in)",
    )
    args = parser.parse_args(argv)
    if not args.host.startswith("127.") and args.host not in ("::1", "localhost"):
        parser.error("loopback only")
    raise_nofile()
    result = {"stream": run_streams, "small": run_small, "latency": run_latency}[args.mode](args)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["own_cpu_s"] = usage.ru_utime + usage.ru_stime  # the runner cannot read it after we exit
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
