"""Programs run as child processes of a test (``parkway serve``, nginx, redis-server, Chromium),
the loopback ports they listen on, and waiting for what they do on their own clock.

Everything that waits takes a deadline; the only polling is for things another process
does (a port starting or stopping to accept), never for something this process can await.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 10.0  # seconds for a child process to start listening

T = TypeVar("T")


# --- binaries -----------------------------------------------------------------------------------


def require_binary(name: str, package: str | None = None) -> str:
    """Path of ``name``; a missing one fails the test (it must not silently skip)."""
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.is_file()), None
    )
    if path is None:
        pytest.fail(
            f"{name} is not installed: `make test` installs it (bash .ci/system-deps), "
            f"or run `apt-get install {package or name}`",
            pytrace=False,
        )
    return path


async def stop_process(proc: trio.Process, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps the process."""
    if proc.returncode is None:
        proc.terminate()
        with trio.move_on_after(grace):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- ports --------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port free right now, for a child process to listen on: nobody listens on it.

    Taken below the kernel's ephemeral range (32768-60999 on Linux), where ``bind(0)`` and
    every outgoing connection take their ports: on a machine where other test runs open
    thousands of loopback connections, a port released by ``bind(0)`` is soon some
    connection's local port, and the child's ``listen`` fails with EADDRINUSE.
    """
    for _ in range(100):
        port = random.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port found below the ephemeral range")


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


async def poll(check: Callable[[], Awaitable[T]], *, timeout: float, interval: float = 0.05) -> T:
    """Call ``check`` until it returns something truthy, for at most ``timeout`` seconds.

    Only for what another process decides on its own clock (a Parkway subprocess trying
    Redis again after ``retry_interval``); never for something this process can await.
    """
    with trio.fail_after(timeout):
        while not (result := await check()):
            await trio.sleep(interval)
        return result


async def connection_refused(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def wait_until_refused(port: int, timeout: float = 5.0) -> None:
    """Poll (another process is closing its listener) until a connection to ``port`` is refused."""
    await poll(partial(connection_refused, port), timeout=timeout, interval=0.02)


async def wait_listening(proc: trio.Process, port: int, what: str, log_files: list[Path]) -> None:
    """Poll ``127.0.0.1:port`` until it accepts, failing at once if ``proc`` exits first."""

    async def listening() -> bool:
        if proc.poll() is not None:
            logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in log_files if p.exists())
            pytest.fail(f"{what} exited with status {proc.returncode} before listening:\n{logs}", pytrace=False)
        return not await connection_refused(port)

    await poll(listening, timeout=READY_TIMEOUT, interval=0.02)


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
