"""A burst of new connections beside one established stream, from a process of its own.

Run as a script (stdlib only) so that neither the burst nor the clock reading the stream's
events shares the proxy's scheduler: ``python burst_client.py --port P --stream TARGET
--burst TARGET --count N``. It opens the stream and waits for its first events (parked), then
opens ``N`` connections at once, each sending one ``GET`` with ``Connection: close``, and reads
every answer to its end while timing each event of the stream as it arrives. Prints one JSON
line: the answers' status codes (``0``: closed without one), how long the burst took to be
answered, and the longest wait between two events of the stream across the burst.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import time


def request(port: int, target: str, close: bool) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stream", required=True, help="request-target of the established stream")
    parser.add_argument("--burst", required=True, help="request-target of every burst request")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--parked-events", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout

    stream = socket.create_connection(("127.0.0.1", args.port), timeout=args.timeout)
    stream.sendall(request(args.port, args.stream, close=False))
    seen = b""
    while seen.count(b"data: ") < args.parked_events:
        data = stream.recv(65536)
        if not data:
            raise SystemExit(f"the stream closed before {args.parked_events} events: {seen!r}")
        seen += data
    stream.setblocking(False)
    poll = select.epoll()
    poll.register(stream.fileno(), select.EPOLLIN)
    arrivals = [time.monotonic()]  # the stream's events, timed as they arrive
    tail = seen[-6:]

    burst = request(args.port, args.burst, close=True)
    started = time.monotonic()
    pending: dict[int, list] = {}  # fd -> [socket, received bytes, sent?]
    for _ in range(args.count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", args.port))
        pending[sock.fileno()] = [sock, b"", False]
        poll.register(sock.fileno(), select.EPOLLOUT)
    statuses: dict[str, int] = {}
    finished = started
    while pending and time.monotonic() < deadline:
        for fd, _ in poll.poll(0.5):
            now = time.monotonic()
            if fd == stream.fileno():
                data = stream.recv(65536)
                if not data:
                    raise SystemExit("the established stream closed during the burst")
                events = (tail + data).count(b"data: ") - tail.count(b"data: ")
                arrivals.extend([now] * events)
                tail = (tail + data)[-6:]
                continue
            entry = pending[fd]
            sock = entry[0]
            if not entry[2]:
                try:
                    sock.send(burst)
                except OSError:
                    data = b""
                else:
                    entry[2] = True
                    poll.modify(fd, select.EPOLLIN)
                    continue
            else:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if data:
                    entry[1] += data
                    continue
            status = entry[1][9:12].decode() if entry[1].startswith(b"HTTP/1.1 ") else "0"
            statuses[status] = statuses.get(status, 0) + 1
            poll.unregister(fd)
            sock.close()
            del pending[fd]
            finished = now
    # The first event after the burst closes the window.
    while time.monotonic() < deadline and arrivals[-1] < finished:
        for _ in poll.poll(0.5):
            data = stream.recv(65536)
            if not data:
                raise SystemExit("the established stream closed after the burst")
            events = (tail + data).count(b"data: ") - tail.count(b"data: ")
            arrivals.extend([time.monotonic()] * events)
            tail = (tail + data)[-6:]
    window = [t for t in arrivals if t <= finished]
    window += [t for t in arrivals if t > finished][:1]
    gaps = [b - a for a, b in zip(window, window[1:]) if b >= started]
    print(
        json.dumps(
            {
                "statuses": statuses,
                "unanswered": len(pending),
                "burst_s": finished - started,
                "max_gap_s": max(gaps, default=None),
                "events_during": sum(1 for t in arrivals if started <= t <= finished),
            }
        )
    )
    stream.close()


if __name__ == "__main__":
    main()
