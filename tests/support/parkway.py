"""Parkway for the tests: its test configuration, run in the test's nursery, and config files.

The timeouts of :data:`TEST_SERVER` are generous on purpose: a test that wants one to fire
sets it itself, with a margin that holds on a loaded machine (see ``test_proxy.py``).
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import trio

from proxy.app import Parkway
from proxy.config import Config, CorsConfig, Credential, ServerConfig
from proxy.jobs.model import JobsConfig
from proxy.websocket.policy import WebSocketConfig
from support.processes import free_port
from support.signing import INJECTED, SECRET, UPSTREAM_KEY, sign

# Small limits so every timeout test finishes in well under a second.
TEST_SERVER = ServerConfig(
    listen=("127.0.0.1:0",),
    header_read_timeout=2.0,
    keepalive_timeout=5.0,
    client_body_timeout=2.0,
    client_write_timeout=2.0,
    upstream_connect_timeout=2.0,
    upstream_first_byte_timeout=5.0,
    upstream_idle_timeout=5.0,
    request_timeout=10.0,
    drain_timeout=5.0,
    # Every test upstream is on loopback, which the SSRF guard refuses by default
    # (test_proxy.py checks that refusal with this turned off).
    allow_private_upstreams=True,
)
TEST_CREDENTIAL = Credential("app", (SECRET,), INJECTED)


def make_config(
    *,
    credentials: tuple[Credential, ...] | None = None,
    cors: CorsConfig | None = None,
    websocket: WebSocketConfig | None = None,
    **server_overrides: Any,
) -> Config:
    return Config(
        server=replace(TEST_SERVER, **server_overrides),
        credentials=(TEST_CREDENTIAL,) if credentials is None else credentials,
        cors=CorsConfig() if cors is None else cors,
        websocket=WebSocketConfig() if websocket is None else websocket,
    )


# --- running in the test's nursery -----------------------------------------------------------------


def with_jobs(config: Config, jobs: JobsConfig, *, prefix: str = "") -> Config:
    """``config`` with ``jobs`` on, listening on a free port that its ``public_url`` names: job
    URLs are built from configuration, so the address must be known before Parkway listens."""
    port = free_port()
    server = replace(config.server, listen=(f"127.0.0.1:{port}",))
    return replace(config, server=server, jobs=replace(jobs, public_url=f"http://127.0.0.1:{port}{prefix}"))


@dataclass
class RunningParkway:
    parkway: Parkway
    config: Config
    addresses: list[str]
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def port(self) -> int:
        return int(self.addresses[0].rpartition(":")[2])

    @property
    def base(self) -> str:
        return f"http://{self.addresses[0]}"

    def sign(
        self,
        proxy_url: str,
        *,
        method: str = "GET",
        id: str = "app",
        secret: str = SECRET,
        expiry: int = 60,
        headers: Mapping[str, str] | None = None,
        body: str | None = None,
        when: datetime | None = None,
    ) -> str:
        """A URL signed by the real ``signway_sdk`` for this Parkway (host = :attr:`base`)."""
        return sign(
            self.base, proxy_url, method=method, id=id, secret=secret, expiry=expiry, headers=headers, body=body,
            when=when,
        )  # fmt: skip


class ParkwayCrashed(Exception):
    """``Parkway.run`` raised: the whole server died (the original traceback is in the message)."""


def _release_frames(exc: BaseException | None, seen: set[int]) -> None:
    """Clear the frames of ``exc``'s tracebacks, recursively, so what they hold is freed now."""
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            try:
                tb.tb_frame.clear()
            except RuntimeError:  # still executing
                pass
            tb = tb.tb_next
        for sub in getattr(exc, "exceptions", ()):
            _release_frames(sub, seen)
        _release_frames(exc.__cause__, seen)
        exc = exc.__context__


async def run_parkway(nursery: trio.Nursery, parkway: Parkway | Config) -> RunningParkway:
    """Run ``parkway`` (or a Parkway of that config) in ``nursery``; ``stopped`` is set when
    ``run`` returns. A crash fails the test at once with the full story."""
    if isinstance(parkway, Config):
        parkway = Parkway(parkway)
    stopped = trio.Event()

    async def run(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await parkway.run(task_status=task_status)
        except Exception as exc:
            # Fail the test at once with the full story, but drop the crashed frames: they
            # hold sockets and async generators whose ResourceWarnings would otherwise be
            # raised in whichever later test the garbage collector happens to run.
            text = "".join(traceback.format_exception(exc))
            _release_frames(exc, set())
            del exc
            raise ParkwayCrashed(f"Parkway.run crashed; the server is gone:\n{text}") from None
        finally:
            stopped.set()

    addresses = await nursery.start(run)
    return RunningParkway(parkway, parkway.config, addresses, stopped)


class Parkways:
    """The Parkways a test started; :meth:`drain` stops them the way an operator does.

    Draining (``shutdown()``) rather than cancelling: cancelling ``Parkway.run`` leaks its
    listening sockets (see ``test_cancelled_parkway_releases_its_port``), which would fail
    unrelated tests.
    """

    def __init__(self, nursery: trio.Nursery):
        self.nursery = nursery
        self.started: list[RunningParkway] = []

    async def start(self, parkway: Parkway | Config) -> RunningParkway:
        running = await run_parkway(self.nursery, parkway)
        self.started.append(running)
        return running

    async def drain(self) -> None:
        for running in self.started:
            running.parkway.shutdown()
        with trio.move_on_after(2):  # then the nursery's cancellation ends what is left
            for running in self.started:
                await running.stopped.wait()


# --- configuration files ---------------------------------------------------------------------------


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


def redis_parkway_toml(
    *,
    port: int,
    admin_port: int,
    redis_url: str,
    failure_policy: str,
    credentials: Iterable[Mapping[str, Any]],
    retry_interval: float = 0.2,
) -> str:
    """A Parkway config whose limits and single-use set live in the Redis at ``redis_url``.

    ``credentials``: one mapping per ``[[credentials]]`` block; values are written as TOML
    (strings, booleans, integers, and ``limits`` as an inline table).
    """
    lines = [
        "[server]",
        f"listen = [{json.dumps(f'127.0.0.1:{port}')}]",
        "drain_timeout = 1",
        "upstream_first_byte_timeout = 5",
        "upstream_idle_timeout = 5",
        "request_timeout = 15",
        "allow_private_upstreams = true  # the test upstream is on loopback",
        "",
        "[admin]",
        f"listen = [{json.dumps(f'127.0.0.1:{admin_port}')}]",
        "",
        "[state]",
        'backend = "redis"',
        f"url = {json.dumps(redis_url)}",
        'key_prefix = "parkway-e2e:"',
        f"failure_policy = {json.dumps(failure_policy)}",
        "timeout = 0.5",
        f"retry_interval = {retry_interval}",
        "",
    ]
    for credential in credentials:
        lines.append("[[credentials]]")
        for key, value in credential.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")
