"""``parkway serve --config FILE --workers 2``: a supervisor and two worker processes.

Each test starts the real command as a process on free ports (the public port shared by
both workers through SO_REUSEPORT, worker i's admin listener on admin port + i) and follows
the JSON log lines the supervisor and its workers write on the shared stderr. The kernel
spreads new connections across the workers by hash, so "both answer" is checked over
enough fresh connections (16) that missing one worker by chance is a 1-in-2^15 event.
"""

from __future__ import annotations

import ast
import os
import signal
import sys
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest
import trio

from support.http import exchange
from support.metrics import scrape
from support.parkway import config_toml
from support.processes import (
    ROOT,
    ParkwayProcess,
    ProcessGroup,
    free_port,
    free_port_run,
    process_alive,
    wait_until_refused,
)
from support.signing import sign
from support.upstream import Exchange, Upstream, echo, sse_from

pytestmark = pytest.mark.usefixtures("hang_guard")
# Each test starts three Python processes (supervisor and two workers) and waits up to 10 s for
# each one's startup line: ~1.5 s on a quiet 2-core machine, several times that on a loaded one.
# The limits only turn a hang into a failure; the waits inside name what did not happen.
HANG_LIMIT = 30.0

SECRET_A = "secret-A-first"
SECRET_B = "secret-B-second"
CONNECTIONS = 16  # fresh connections per check: both workers are hit unless 1 in 2^15
EVENT_1 = b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
EVENT_2 = b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\ndata: [DONE]\n\n'


def write_config(path: Path, port: int, admin_port: int, secret: str) -> None:
    path.write_text(config_toml(listen=f"127.0.0.1:{port}", admin=f"127.0.0.1:{admin_port}", secret=[secret]))


async def start_workers(processes: ProcessGroup, tmp_path: Path) -> tuple[ParkwayProcess, dict[int, int]]:
    """The supervisor, once both workers log ``startup``; also worker index -> pid."""
    port, admin_port = free_port(), free_port_run(2)
    path = tmp_path / "parkway.toml"
    write_config(path, port, admin_port, SECRET_A)
    supervisor = await processes.spawn(path, port, "--workers", "2", admin_port=admin_port)
    pids = {}
    for index in (0, 1):
        (startup,) = await supervisor.logs.wait_for(event="startup", worker=index, timeout=10)
        assert startup["listen"] == [f"127.0.0.1:{port}"]
        assert startup["admin"] == [f"127.0.0.1:{admin_port + index}"]
        pids[index] = startup["pid"]
    assert len({supervisor.pid, *pids.values()}) == 3
    # The default state backend is memory: said once, by the supervisor, before the workers start.
    (kept,) = await supervisor.logs.wait_for(event="state_per_worker", timeout=1)
    assert (kept["level"], kept["workers"], kept["kept"]) == ("warning", 2, ["single-use URLs"])
    assert "worker" not in kept and 'backend = "redis"' in kept["problem"]
    return supervisor, pids


async def requests_on_fresh_connections(
    supervisor: ParkwayProcess, upstream: Upstream, secret: str, count: int = CONNECTIONS
) -> list[int]:
    statuses = []
    for i in range(count):
        url = sign(supervisor.base, f"{upstream.base}/v1/models?n={i}", secret=secret)
        statuses.append((await exchange(supervisor.port, "GET", url)).status)
    return statuses


async def served_by(supervisor: ParkwayProcess, count: int, **fields) -> set[int]:
    """The workers whose request log lines match ``fields``, once ``count`` such lines are logged."""
    lines = await supervisor.logs.wait_for(count, event="request", **fields)
    return {line["worker"] for line in lines}


async def healthz(client: httpx.AsyncClient, admin_port: int) -> int:
    return (await client.get(f"http://127.0.0.1:{admin_port}/healthz")).status_code


# A fourth process (the replacement) and 40 requests on fresh connections: 3.6 s quiet, past 10 s
# loaded; its own bounded waits (startup, worker_started, startup: 10 s each) fit inside 45 s.
@pytest.mark.hang_limit(45)
async def test_both_workers_answer_and_a_killed_worker_is_replaced(processes, upstream, client, tmp_path):
    supervisor, pids = await start_workers(processes, tmp_path)
    admin = supervisor.admin_port

    assert (await healthz(client, admin), await healthz(client, admin + 1)) == (200, 200)
    assert await requests_on_fresh_connections(supervisor, upstream, SECRET_A) == [200] * CONNECTIONS
    assert await served_by(supervisor, CONNECTIONS, outcome="ok") == {0, 1}

    os.kill(pids[1], signal.SIGKILL)
    (died,) = await supervisor.logs.wait_for(event="worker_died", worker=1)
    assert (died["pid"], died["code"]) == (pids[1], -signal.SIGKILL)

    # Until the replacement is up, worker 0 alone serves every connection.
    assert await requests_on_fresh_connections(supervisor, upstream, SECRET_A, 8) == [200] * 8
    _, replacement = await supervisor.logs.wait_for(2, event="worker_started", worker=1, timeout=10)
    _, startup = await supervisor.logs.wait_for(2, event="startup", worker=1, timeout=10)
    assert startup["pid"] == replacement["pid"] not in pids.values()
    assert startup["admin"] == [f"127.0.0.1:{admin + 1}"]
    assert not process_alive(pids[1])
    assert process_alive(pids[0])
    assert (await healthz(client, admin), await healthz(client, admin + 1)) == (200, 200)

    # The replacement takes its share of new connections again.
    before = len(supervisor.logs.find(event="request"))
    assert await requests_on_fresh_connections(supervisor, upstream, SECRET_A) == [200] * CONNECTIONS
    lines = (await supervisor.logs.wait_for(before + CONNECTIONS, event="request"))[before:]
    assert {line["worker"] for line in lines} == {0, 1}

    supervisor.signal(signal.SIGTERM)
    assert await supervisor.wait_exit() == 0


async def test_sighup_to_the_supervisor_reloads_every_worker(processes, upstream, client, tmp_path):
    supervisor, pids = await start_workers(processes, tmp_path)

    write_config(supervisor.config_path, supervisor.port, supervisor.admin_port, SECRET_B)
    supervisor.signal(signal.SIGHUP)
    reloaded = await supervisor.logs.wait_for(2, event="config_reloaded")

    assert {line["worker"] for line in reloaded} == {0, 1}
    assert supervisor.logs.find(event="reload_workers")
    assert await requests_on_fresh_connections(supervisor, upstream, SECRET_B) == [200] * CONNECTIONS
    assert await requests_on_fresh_connections(supervisor, upstream, SECRET_A) == [403] * CONNECTIONS
    # Both workers took the new secret and both refuse the old one.
    assert await served_by(supervisor, CONNECTIONS, outcome="ok") == {0, 1}
    assert await served_by(supervisor, CONNECTIONS, outcome="refused:signature_mismatch") == {0, 1}
    assert not supervisor.logs.find(event="worker_died")
    for index in (0, 1):
        metrics = await scrape(client, f"127.0.0.1:{supervisor.admin_port + index}")
        assert metrics.by("parkway_config_reloads_total", "result") == {("ok",): 1}

    supervisor.signal(signal.SIGTERM)
    assert await supervisor.wait_exit() == 0


async def test_sigterm_to_the_supervisor_drains_streams_and_leaves_no_workers(processes, upstream, client, tmp_path):
    supervisor, pids = await start_workers(processes, tmp_path)
    send, receive = trio.open_memory_channel[bytes](0)

    async def behaviour(ex: Exchange) -> None:
        await (sse_from(receive) if ex.request.path == "/v1/stream" else echo)(ex)

    upstream.behaviour = behaviour
    url = sign(supervisor.base, f"{upstream.base}/v1/stream", method="POST", secret=SECRET_A)

    async with (
        send,
        client.stream("POST", url, json={"stream": True}) as response,
        aclosing(response.aiter_raw()) as chunks,
    ):
        assert response.status_code == 200
        got = b""
        with trio.fail_after(5):
            await send.send(EVENT_1)
            while len(got) < len(EVENT_1):
                got += await chunks.__anext__()

        supervisor.signal(signal.SIGTERM)
        await supervisor.logs.wait_for(event="stopping_workers")
        await supervisor.logs.wait_for(2, event="draining")
        await wait_until_refused(supervisor.port)  # neither worker accepts any more

        with trio.fail_after(5):
            await send.send(EVENT_2)
            await send.aclose()
            async for chunk in chunks:
                got += chunk
    assert got == EVENT_1 + EVENT_2

    assert await supervisor.wait_exit() == 0
    assert supervisor.logs.find(event="supervisor_stopped")
    exits = supervisor.logs.find(event="worker_exited")
    assert sorted((e["worker"], e["pid"], e["code"]) for e in exits) == [(0, pids[0], 0), (1, pids[1], 0)]
    assert not supervisor.logs.find(event="killing_workers")
    assert [pid for pid in pids.values() if process_alive(pid)] == []


async def test_sighup_while_workers_are_starting_does_not_kill_them(processes, upstream, tmp_path):
    """A reload sent while a worker is still starting (just spawned, or being replaced after a
    crash) must not kill it: until its own handler is installed, SIGHUP's default action
    terminates a process."""
    port, admin_port = free_port(), free_port_run(2)
    path = tmp_path / "parkway.toml"
    write_config(path, port, admin_port, SECRET_A)
    supervisor = await processes.spawn(path, port, "--workers", "2", admin_port=admin_port)
    await supervisor.logs.wait_for(2, event="worker_started", timeout=10)

    supervisor.signal(signal.SIGHUP)  # the workers are spawned, still importing their modules
    await supervisor.logs.wait_for(event="reload_workers")
    await supervisor.logs.wait_for(2, event="startup", timeout=10)

    assert [(e["worker"], e["code"]) for e in supervisor.logs.find(event="worker_died")] == []
    assert await requests_on_fresh_connections(supervisor, upstream, SECRET_A, 4) == [200] * 4
    supervisor.signal(signal.SIGTERM)
    assert await supervisor.wait_exit() == 0


# Run in a child process: logs.configure() sets structlog up for the whole process.
ONE_LINE_PER_WRITE = r"""
import io, sys
import structlog
from proxy import logs

class Raw(io.RawIOBase):
    def __init__(self):
        self.calls = []
    def writable(self):
        return True
    def write(self, data):
        self.calls.append(bytes(data))
        return len(data)

raw = Raw()
# What stderr is under `python -u` or PYTHONUNBUFFERED=1 (usual in containers): every write()
# goes straight to the file descriptor the supervisor and all its workers share.
logs.configure("info", "json", stream=io.TextIOWrapper(raw, write_through=True))
structlog.get_logger("parkway").info("startup", worker=1, pid=42)
structlog.get_logger("parkway.request").warning("request", status=403, outcome="refused:expired")
print(repr(raw.calls))
"""


async def test_each_log_line_is_one_write_so_workers_sharing_stderr_never_interleave():
    with trio.fail_after(10):
        result = await trio.run_process([sys.executable, "-c", ONE_LINE_PER_WRITE], cwd=ROOT, capture_stdout=True)
    calls = ast.literal_eval(result.stdout.decode())

    # Two workers logging at once must not produce '{...}{...}\n\n' on the shared pipe.
    assert len(calls) == 2 and all(call.endswith(b"\n") and call.count(b"\n") == 1 for call in calls), calls
