"""Helpers for the operations tests: raw exchanges that count bytes, Prometheus parsing,
TOML files, and Parkway run as a real process whose JSON log lines can be awaited.

Everything that waits takes a deadline; the only polling is for things another process
does (a port starting or stopping to accept), never for something this process can await.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h11
import trio
from prometheus_client.parser import text_string_to_metric_families
from signway_sdk import sign_url

from helpers import UPSTREAM_KEY, RunningParkway, read_until_eof, request_bytes
from proxy.app import Parkway

ROOT = Path(__file__).resolve().parents[1]


# --- raw exchanges -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exchanged:
    """One request on its own connection: what went over the wire, and the decoded answer."""

    sent: int  # bytes written to the socket
    received: int  # bytes read from it, until Parkway closed it
    status: int
    headers: dict[str, str]
    body: bytes  # de-chunked

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(method: str, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Decode a complete raw response with a real h11 client (chunked framing included)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x"), ("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    status, headers, body = 0, {}, bytearray()
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {n.decode(): v.decode("latin-1") for n, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, bytes(body)
        else:
            raise AssertionError(f"incomplete response ({event!r}): {raw[:300]!r}")


async def exchange(
    port: int, method: str, url: str, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()
) -> Exchanged:
    """Send one request on a new connection (``Connection: close``) and read until Parkway closes it."""
    request = request_bytes(method, url, body, [("connection", "close"), *headers])
    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request)
            raw = await read_until_eof(stream)
    status, response_headers, response_body = parse_response(method, raw)
    return Exchanged(len(request), len(raw), status, response_headers, response_body)


async def send_raw(port: int, data: bytes) -> tuple[int, bytes]:
    """Write ``data`` as is on a new connection; return the bytes written and everything read back."""
    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(data)
            return len(data), await read_until_eof(stream)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def sign(base: str, proxy_url: str, *, secret: str, id: str = "app", method: str = "GET", expiry: int = 60,
         when: datetime | None = None) -> str:
    """A URL signed by the real signway-sdk for the Parkway at ``base``."""
    return sign_url(
        id=id, secret=secret, host=base, proxy_url=proxy_url, expiry=expiry, method=method,
        datetime_override=when or datetime.now(timezone.utc),
    )


# --- Prometheus ----------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, keyed by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@dataclass(frozen=True)
class Scrape:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        """One sample's value; 0 when it was never exported (a counter never incremented)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def by(self, name: str, *label_names: str) -> dict[tuple[str, ...], float]:
        """Every sample of ``name``, keyed by the values of ``label_names``."""
        return {
            tuple(dict(labels)[n] for n in label_names): value
            for (sample, labels), value in self.samples.items()
            if sample == name
        }

    def label_values(self, label: str) -> set[str]:
        return {v for (_, labels), _ in self.samples.items() for k, v in labels if k == label}


async def scrape(client: Any, admin: str) -> Scrape:
    response = await client.get(f"http://{admin}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return Scrape(parse_metrics(response.text))


# --- configuration files -------------------------------------------------------------------------


def config_toml(
    *,
    listen: str = "127.0.0.1:0",
    admin: str | None = "127.0.0.1:0",
    secret: Sequence[str] = (),
    secret_env: Sequence[str] = (),
    drain_timeout: float = 5.0,
    extra_server: str = "",
) -> str:
    """A Parkway TOML file with one credential ``app`` injecting the test upstream key."""
    lines = [
        "[server]",
        f"listen = [{json.dumps(listen)}]",
        f"drain_timeout = {drain_timeout}",
        "upstream_first_byte_timeout = 5",
        "upstream_idle_timeout = 5",
        "request_timeout = 15",
        "allow_private_upstreams = true  # the test upstreams are on loopback",
        extra_server,
        "",
        "[admin]",
        f"listen = {json.dumps([admin] if admin else [])}",
        "",
        "[[credentials]]",
        'id = "app"',
    ]
    if secret:
        lines.append(f"secret = {json.dumps(list(secret))}")
    if secret_env:
        lines.append(f"secret_env = {json.dumps(list(secret_env))}")
    lines += ["[credentials.headers]", f'Authorization = "Bearer {UPSTREAM_KEY}"', ""]
    return "\n".join(lines)


def free_port() -> int:
    """A loopback port free right now (bound to 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (worker i's admin is base + i)."""
    for _ in range(50):
        base = free_port()
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no run of {count} free ports found")


async def connection_refused(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def wait_until_refused(port: int, timeout: float = 5.0) -> None:
    """Poll (another process is closing its listener) until a connection to ``port`` is refused."""
    with trio.fail_after(timeout):
        while not await connection_refused(port):
            await trio.sleep(0.02)


# --- Parkway in this process ---------------------------------------------------------------------


async def start_instance(nursery: trio.Nursery, parkway: Parkway) -> RunningParkway:
    """Run ``parkway`` in ``nursery``; ``stopped`` is set when ``run`` returns."""
    stopped = trio.Event()

    async def run(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await parkway.run(task_status=task_status)
        finally:
            stopped.set()

    addresses = await nursery.start(run)
    return RunningParkway(parkway, parkway.config, addresses, stopped)


# --- Parkway as a process ------------------------------------------------------------------------


class ProcessLogs:
    """The JSON log lines a Parkway process writes on stderr, as they arrive."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._changed = trio.Event()
        self.closed = False

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        async with stream:
            while data := await stream.receive_some(65536):
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._add(line.decode("utf-8", "replace"))
        if pending:
            self._add(pending.decode("utf-8", "replace"))
        self.closed = True
        self._changed.set()

    def _add(self, line: str) -> None:
        self.text.append(line)
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict):
            self.entries.append(entry)
        self._changed.set()
        self._changed = trio.Event()

    def find(self, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.entries if all(e.get(k) == v for k, v in fields.items())]

    async def wait_for(self, count: int = 1, *, timeout: float = 5.0, **fields: Any) -> list[dict[str, Any]]:
        """The first ``count`` entries whose fields match, waiting up to ``timeout`` for them."""
        try:
            with trio.fail_after(timeout):
                while len(found := self.find(**fields)) < count:
                    if self.closed:
                        raise trio.TooSlowError
                    await self._changed.wait()
        except trio.TooSlowError:
            tail = "\n".join(self.text[-30:])
            raise AssertionError(f"no {count} log line(s) with {fields} within {timeout:g} s; log:\n{tail}") from None
        return found[:count]


@dataclass
class ParkwayProcess:
    process: trio.Process
    logs: ProcessLogs
    config_path: Path
    port: int  # the public port
    admin_port: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait_exit(self, timeout: float = 10.0) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()

    def worker_pids(self) -> set[int]:
        """Every pid that logged a ``startup`` line (the process itself, or its workers)."""
        return {e["pid"] for e in self.logs.find(event="startup")}


@dataclass
class ProcessGroup:
    """The processes a test started; :meth:`cleanup` ends those still running, by pid."""

    nursery: trio.Nursery
    started: list[ParkwayProcess] = field(default_factory=list)

    async def spawn(self, config_path: Path, port: int, *args: str, admin_port: int | None = None) -> ParkwayProcess:
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config_path), *args]
        # Buffered stderr, so each log line is one write even when workers log at the same
        # instant (unbuffered, they interleave: test_workers.py has a test of its own for that).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        process = await trio.lowlevel.open_process(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        logs = ProcessLogs()
        self.nursery.start_soon(logs.pump, process.stderr)
        running = ParkwayProcess(process, logs, config_path, port, admin_port)
        self.started.append(running)
        return running

    async def cleanup(self) -> None:
        for running in self.started:
            if running.process.returncode is None:
                running.process.kill()
            # Workers outlive a killed supervisor for a moment; end only our own (same config file).
            for pid in running.worker_pids() - {running.pid}:
                if str(running.config_path) in _cmdline(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        with trio.move_on_after(5):
            for running in self.started:
                await running.process.wait()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def process_alive(pid: int) -> bool:
    """Whether ``pid`` still exists (a reaped worker does not; a zombie would)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
