"""A real ``redis-server`` for tests: a child process on a free loopback port, in a temp dir.

``make test`` installs the binary (``.ci/system-deps``); a missing one fails the test with a
message saying so. The server runs in the foreground with its log on a pipe; readiness is its
own "Ready to accept connections" line, not a poll. ``kill()`` is a crash (SIGKILL: nothing is
saved, as no persistence is configured); ``start()`` again brings it back on the same port.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trio

from support.processes import READY_TIMEOUT, free_port, require_binary

READY_LINE = b"Ready to accept connections"


class RedisServer:
    """One redis-server child process; its log is drained by a task in ``nursery``."""

    def __init__(self, nursery: trio.Nursery, directory: Path, port: int | None = None):
        self.nursery = nursery
        self.directory = directory
        self.port = port or free_port()
        self.process: trio.Process | None = None
        self.log = bytearray()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        """Start the server and return once it accepts connections."""
        assert not self.running, "already running"
        self.log.clear()
        command = [
            require_binary("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--logfile", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        self.process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        ready = trio.Event()
        self.nursery.start_soon(self._drain, self.process, ready)
        with trio.fail_after(READY_TIMEOUT):
            await ready.wait()
        if not self.running or READY_LINE not in self.log:
            await self.kill()
            pytest.fail(f"redis-server did not start:\n{self.log.decode(errors='replace')}", pytrace=False)

    async def _drain(self, process: trio.Process, ready: trio.Event) -> None:
        assert process.stdout is not None
        async with process.stdout:
            while data := await process.stdout.receive_some(65536):
                self.log += data
                if READY_LINE in self.log:
                    ready.set()
        ready.set()  # exited: start() reports it

    async def kill(self) -> None:
        """Crash the server (SIGKILL) and wait until it is gone."""
        if self.process is not None:
            if self.process.returncode is None:
                self.process.kill()
            with trio.CancelScope(shield=True), trio.fail_after(READY_TIMEOUT):
                await self.process.wait()
