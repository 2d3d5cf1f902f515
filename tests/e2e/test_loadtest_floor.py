"""The load test's floor (``loadtest.floor``) and call counter (``loadtest.calls``), on real sockets:
the floor must answer as a proxy does (the key injected, answers relayed unchanged, keep-alive,
pipelining, ``Connection: close``) for its figures to mean anything, must refuse anything but
loopback, and a fenced profile must hold exactly the requests the load generator counted."""

from __future__ import annotations

import json
import os
import pstats
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest import calls, floor, upstream
from loadtest.loadgen import Response
from loadtest.runner import free_port

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
SMALL = b'{"model":"mock-gpt","messages":[{"role":"user","content":"Say hello"}]}'
STREAM = b'{"model":"mock-gpt","stream":true,"messages":[{"role":"user","content":"Tell me"}]}'


class Procs:
    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, *argv: str, env: dict[str, str] = ENV, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=env, **kwargs)
        self.started.append(proc)
        return proc

    def upstream(self) -> int:
        proc = self.start("loadtest.upstream", "--max-seconds", "60", stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        return int(line.split()[1])

    def floor(
        self, up: int, *argv: str, module: tuple[str, ...] = (), env: dict[str, str] = ENV
    ) -> tuple[int, subprocess.Popen]:
        port = free_port()
        args = ["loadtest.floor", "--port", str(port), "--upstream", f"127.0.0.1:{up}", "--max-seconds", "60", *argv]
        proc = self.start(*module, *args, env=env, stderr=subprocess.PIPE, text=True)
        startup = json.loads(proc.stderr.readline())
        assert startup["event"] == "startup", startup
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port, proc
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the floor did not listen"
                time.sleep(0.05)


@pytest.fixture
def procs() -> Iterator[Procs]:
    group = Procs()
    yield group
    for proc in reversed(group.started):
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def request(target: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def read_answers(sock: socket.socket, count: int) -> list[tuple[Response, bytes]]:
    """``count`` answers in order, each parsed and as raw bytes."""
    answers, buffered = [], b""
    while len(answers) < count:
        resp, raw = Response(), b""
        data, buffered = buffered, b""
        while True:
            if not data:
                data = sock.recv(65536)
                assert data, f"closed after {len(answers)} answer(s)"
            # Feed byte by byte past the end would be wrong: find where this answer ends.
            for i in range(1, len(data) + 1):
                if resp.feed(data[i - 1 : i]):
                    raw += data[:i]
                    buffered = data[i:]
                    break
            else:
                raw += data
                data = b""
                continue
            break
        answers.append((resp, raw))
    return answers


def test_floor_refuses_anything_but_loopback() -> None:
    for argv in (
        ["--port", "8080", "--upstream", "10.0.0.1:80"],
        ["--port", "8080", "--upstream", "example.com:80"],
        ["--host", "0.0.0.0", "--port", "8080", "--upstream", "127.0.0.1:80"],
    ):
        with pytest.raises(SystemExit) as exc:
            floor.main(argv)
        assert exc.value.code == 2, argv


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_floor_relays_answers_with_the_key_injected(procs: Procs, http: str) -> None:
    up = procs.upstream()
    port, proc = procs.floor(up, "--http", http)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # The upstream answers 401 without `Authorization: Bearer sk-loadtest`: a wrong key from
        # the client is replaced, not passed on.
        sock.sendall(request("/v1/chat/completions?small=1", SMALL, "Authorization: Bearer wrong\r\n"))
        [(small, raw)] = read_answers(sock, 1)
        assert (small.status, small.error) == (200, None)
        if http == "httptools":  # passed through byte for byte
            assert raw == upstream.SMALL_RESPONSE
        else:
            assert raw.endswith(b"\r\n\r\n" + upstream.SMALL_BODY)
        # A chunked SSE answer on the same connection, then two pipelined requests in one write.
        sock.sendall(request("/v1/chat/completions?events=4&interval_ms=5&size=140", STREAM))
        [(stream, raw)] = read_answers(sock, 1)
        assert (stream.status, stream.error, stream.chunked, stream.events) == (200, None, True, 4)
        sock.sendall(request("/v1/chat/completions?small=1", SMALL) * 2)
        assert [(r.status, r.error) for r, _ in read_answers(sock, 2)] == [(200, None)] * 2
        # The client's `Connection: close` is honoured after its answer.
        sock.sendall(request("/v1/chat/completions?small=1", SMALL, "Connection: close\r\n"))
        [(last, _)] = read_answers(sock, 1)
        assert last.status == 200
        assert sock.recv(100) == b""
    assert proc.poll() is None


def test_fenced_profile_holds_exactly_the_counted_requests(procs: Procs, tmp_path: Path) -> None:
    """``loadgen small --signal-pid`` drains the clients at both edges of its window: every request
    the floor completed under the profiler is one the load generator counted, no more, no fewer."""
    up = procs.upstream()
    prof = tmp_path / "floor.prof"
    port, proc = procs.floor(up, module=("loadtest.calls",), env={**ENV, "CALLS_OUT": str(prof)})
    argv = ["loadtest.loadgen", "small", "--port", str(port), "--target", "/v1/chat/completions?small=1",
            "--body", SMALL.decode(), "--clients", "8", "--seconds", "1", "--warmup", "0.5",
            "--signal-pid", str(proc.pid), "--deadline", "60"]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=90)
    result = json.loads(next(line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")))
    assert result["error_count"] == 0 and result["counted"] > 8, result
    assert result["requests"] > result["counted"]  # the warm-up's requests were served, not profiled

    completed = [
        calls_
        for (file, _, name), (_, calls_, *_rest) in pstats.Stats(str(prof)).stats.items()  # type: ignore[attr-defined]
        if file.endswith("floor.py") and name == "on_message_complete"
    ]
    assert completed == [result["counted"]] * 2  # requests read, answers' ends found
    summary = calls.summarise(prof, result["counted"])
    assert summary["calls_by_component"]["floor (loadtest/floor.py)"] >= 5  # its callbacks, recv, the head
    assert summary["calls_by_component"]["trio"] > 0
    assert summary["calls_per_request"] == pytest.approx(sum(summary["calls_by_component"].values()))


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_floor_answers_502_when_the_upstream_is_down(procs: Procs, http: str) -> None:
    port, _ = procs.floor(free_port(), "--http", http)  # nothing listens there
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request("/v1/chat/completions?small=1", SMALL))
        [(answer, _)] = read_answers(sock, 1)
        assert answer.status == 502
        assert sock.recv(100) == b""
