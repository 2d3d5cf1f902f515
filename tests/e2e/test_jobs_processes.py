"""Background jobs across restarts and process deaths: real ``parkway serve`` processes.

* SQLite: a process killed (SIGKILL) in the middle of a job; the next start on the same file
  takes the job over once its lease ends, completes it and delivers it once.
* SIGTERM: the drain puts the running job back in the queue; the next start runs it.
* Redis: two processes share the store; the one running the job is killed, the other finishes it.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from standardwebhooks.webhooks import Webhook

from proxy.jobs import webhooks
from support.processes import ParkwayProcess, ProcessGroup, free_port
from support.redis import RedisServer
from support.signing import SECRET, UPSTREAM_KEY, sign
from support.upstream import Exchange, Upstream, echo, respond_with

HANG_LIMIT = 40.0
WHSEC = webhooks.format_secret(bytes(range(32)))
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Summarise"}]}
LEASE = 1.0


class FirstCallHangs:
    """The upstream holds its first request open (until the process making it dies); later ones echo."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, ex: Exchange) -> None:
        self.calls += 1
        if self.calls == 1:
            await trio.sleep_forever()
        await echo(ex)


def jobs_toml(port: int, receiver: Upstream, *, path: Path | None = None, redis_url: str | None = None,
              drain_timeout: float = 1.0) -> str:  # fmt: skip
    store = 'store = "redis"\n' if redis_url else f"path = {json.dumps(str(path))}\n"
    state = f'[state]\nurl = {json.dumps(redis_url)}\nkey_prefix = "jobs-e2e:"\n' if redis_url else ""
    return f"""
[server]
listen = ["127.0.0.1:{port}"]
drain_timeout = {drain_timeout}
upstream_first_byte_timeout = 30
request_timeout = 60
allow_private_upstreams = true  # the test upstream and receiver are on loopback

[admin]
listen = []

[jobs]
public_url = "http://127.0.0.1:{port}"
{store}lease = {LEASE}
poll_interval = 0.1
retry_schedule = [0.2, 0.2, 0.2]

{state}
[[credentials]]
id = "app"
secret = "{SECRET}"
allowed_callbacks = ["{receiver.base}/hooks/"]
webhook_secret = "{WHSEC}"
[credentials.headers]
Authorization = "Bearer {UPSTREAM_KEY}"
"""


async def spawn(processes: ProcessGroup, tmp_path: Path, name: str, text_for_port: Any) -> ParkwayProcess:
    port = free_port()
    config = tmp_path / f"{name}.toml"
    config.write_text(text_for_port(port))
    running = await processes.spawn(config, port)
    await running.logs.wait_for(event="startup", timeout=10)
    return running


async def submit(running: ParkwayProcess, upstream: Upstream, receiver: Upstream) -> dict[str, Any]:
    url = sign(running.base, f"{upstream.base}/v1/chat/completions", method="POST", signer="proxy.signing",
                 params={"pw_callback": f"{receiver.base}/hooks/done"})  # fmt: skip
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        response = await client.post(url, json=CHAT)
    assert response.status_code == 202, response.text
    return response.json()


async def status(running: ParkwayProcess, job_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        return (await client.get(f"{running.base}/jobs/{job_id}")).json()


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> Upstream:
    return await nursery.start(Upstream(respond_with(204, b"")).serve)


def verified(delivery, job_id: str) -> Mapping[str, Any]:
    payload = Webhook(WHSEC).verify(delivery.body, dict(delivery.headers))
    assert payload["data"]["id"] == job_id
    return payload


async def test_a_job_cut_by_a_crash_completes_after_restart(processes, tmp_path, upstream, receiver) -> None:
    upstream.behaviour = FirstCallHangs()
    store = tmp_path / "jobs.sqlite3"
    first = await spawn(processes, tmp_path, "first", lambda port: jobs_toml(port, receiver, path=store))
    job = await submit(first, upstream, receiver)
    await upstream.wait_for_requests(1)  # the upstream call is in flight ...
    first.process.kill()  # ... when the process dies without any goodbye
    await first.wait_exit()

    second = await spawn(processes, tmp_path, "second", lambda port: jobs_toml(port, receiver, path=store))
    await upstream.wait_for_requests(2)  # taken over once the dead process's lease ran out
    (line,) = await second.logs.wait_for(event="webhook_delivery", timeout=10)
    assert line["result"] == "delivered"
    (delivery,) = receiver.requests  # delivered once: the crashed process never got that far
    payload = verified(delivery, job["id"])
    assert payload["type"] == "job.completed" and payload["data"]["attempts"] == 2
    assert (await status(second, job["id"]))["status"] == "completed"
    second.signal(signal.SIGTERM)
    assert await second.wait_exit() == 0


async def test_sigterm_leaves_the_running_job_queued_for_the_next_start(
    processes, tmp_path, upstream, receiver
) -> None:
    upstream.behaviour = FirstCallHangs()
    store = tmp_path / "jobs.sqlite3"
    toml = partial(jobs_toml, receiver=receiver, path=store, drain_timeout=0.3)
    first = await spawn(processes, tmp_path, "first", toml)
    job = await submit(first, upstream, receiver)
    await upstream.wait_for_requests(1)
    first.signal(signal.SIGTERM)
    await first.logs.wait_for(event="job_requeued", timeout=5)
    assert await first.wait_exit() == 0
    assert upstream.disconnected.is_set() and receiver.requests == []

    second = await spawn(processes, tmp_path, "second", toml)
    (line,) = await second.logs.wait_for(event="webhook_delivery", timeout=10)
    assert line["result"] == "delivered"
    assert verified(receiver.requests[0], job["id"])["type"] == "job.completed"
    assert len(upstream.requests) == 2
    second.signal(signal.SIGTERM)
    assert await second.wait_exit() == 0


async def test_two_processes_on_redis_one_killed_the_other_finishes(
    processes, nursery, tmp_path, upstream, receiver
) -> None:
    redis = RedisServer(nursery, tmp_path)
    with trio.fail_after(10):
        await redis.start()
    try:
        upstream.behaviour = FirstCallHangs()
        toml = partial(jobs_toml, receiver=receiver, redis_url=redis.url)
        a = await spawn(processes, tmp_path, "a", toml)
        b = await spawn(processes, tmp_path, "b", toml)
        job = await submit(a, upstream, receiver)
        await upstream.wait_for_requests(1)
        # Either process may have claimed it: kill the one that did.
        holder, other = (a, b) if a.logs.find(event="job_started") else (b, a)
        assert holder.logs.find(event="job_started") and not other.logs.find(event="job_started")
        holder.process.kill()
        await holder.wait_exit()
        (line,) = await other.logs.wait_for(event="webhook_delivery", timeout=10)
        assert line["result"] == "delivered"
        (delivery,) = receiver.requests
        assert verified(delivery, job["id"])["data"]["attempts"] == 2
        assert (await status(other, job["id"]))["status"] == "completed"
        other.signal(signal.SIGTERM)
        assert await other.wait_exit() == 0
    finally:
        await redis.kill()


async def test_two_workers_share_the_sqlite_file_and_run_each_job_once(processes, tmp_path, upstream, receiver) -> None:
    """``--workers 2``: two processes claim from one SQLite file; BEGIN IMMEDIATE keeps claims apart."""
    store = tmp_path / "jobs.sqlite3"
    port = free_port()
    config = tmp_path / "workers.toml"
    config.write_text(jobs_toml(port, receiver, path=store))
    supervisor = await processes.spawn(config, port, "--workers", "2")
    await supervisor.logs.wait_for(2, event="startup", timeout=15)
    submitted = [await submit(supervisor, upstream, receiver) for _ in range(8)]
    await receiver.wait_for_requests(8)
    delivered = sorted(Webhook(WHSEC).verify(d.body, dict(d.headers))["data"]["id"] for d in receiver.requests)
    assert delivered == sorted(job["id"] for job in submitted)  # each job delivered once
    assert len(upstream.requests) == 8  # and run once
    started = supervisor.logs.find(event="job_started")
    assert len(started) == 8 and len({line["job"] for line in started}) == 8
    supervisor.signal(signal.SIGTERM)
    assert await supervisor.wait_exit(timeout=15) == 0
