"""A reload reaches proxied requests (issue 18): the upstream timeouts and CA file apply to the
next request, and what needs a restart is named key by key in ``config_reload_needs_restart``."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio

from proxy.app import Parkway
from proxy.config import load_config
from support.http import call
from support.logs import watch_logs
from support.parkway import Parkways, RunningParkway, config_toml
from support.scripted import ScriptedRequest, ScriptedUpstream, TLSUpstream, make_certificate
from support.signing import SECRET

GUARD = 4.0  # below the file's upstream_first_byte_timeout of 5 s


@pytest.fixture
async def from_file(
    nursery: trio.Nursery, hang_guard: None
) -> AsyncIterator[Callable[[Path], Awaitable[RunningParkway]]]:
    parkways = Parkways(nursery)

    async def start(path: Path) -> RunningParkway:
        return await parkways.start(Parkway(load_config(path), config_path=path))

    yield start
    await parkways.drain()
    gc.collect()


async def test_a_reloaded_first_byte_timeout_applies_to_the_next_request(from_file, nursery, tmp_path):
    silent = trio.Event()  # never set: the upstream reads the request and says nothing

    async def never(req: ScriptedRequest) -> None:
        await silent.wait()

    scripted = await nursery.start(ScriptedUpstream([never]).serve)
    path = tmp_path / "parkway.toml"
    path.write_text(config_toml(secret=[SECRET]))  # upstream_first_byte_timeout = 5
    running = await from_file(path)

    path.write_text(
        config_toml(secret=[SECRET]).replace("upstream_first_byte_timeout = 5", "upstream_first_byte_timeout = 0.3")
    )
    assert running.parkway.reload() == []
    reply = await call(running.port, "GET", running.sign(f"{scripted.base}/v1/slow"), timeout=GUARD)

    assert (reply.status, reply.code) == (504, "upstream_timeout")
    assert "0.3 s" in reply.message


async def test_a_reloaded_ca_file_applies_to_the_next_request(from_file, nursery, tmp_path):
    certificate = make_certificate(tmp_path)
    upstream = await nursery.start(TLSUpstream(certificate).serve)
    path = tmp_path / "parkway.toml"
    path.write_text(config_toml(secret=[SECRET]))
    running = await from_file(path)
    before = await call(running.port, "GET", running.sign(f"{upstream.base}/v1/models"), timeout=GUARD)

    path.write_text(config_toml(secret=[SECRET], extra_server=f"upstream_ca_file = {str(certificate.cert)!r}"))
    assert running.parkway.reload() == []
    after = await call(running.port, "GET", running.sign(f"{upstream.base}/v1/models"), timeout=GUARD)

    assert before.status == 502  # the system's CAs do not know the test certificate
    assert after.status == 200


async def test_a_ca_file_that_cannot_be_loaded_refuses_the_reload(from_file, tmp_path):
    path = tmp_path / "parkway.toml"
    path.write_text(config_toml(secret=[SECRET]))
    running = await from_file(path)
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("not a certificate")

    path.write_text(config_toml(secret=[SECRET], extra_server=f"upstream_ca_file = {str(bad)!r}"))
    problems = running.parkway.reload()

    assert problems and problems[0].startswith("server.upstream_ca_file")
    assert running.parkway.config.server.upstream_ca_file in ("", None)


async def test_settings_read_only_at_start_are_named_by_key_path(from_file, tmp_path):
    path = tmp_path / "parkway.toml"
    path.write_text(config_toml(secret=[SECRET]))
    running = await from_file(path)

    changed = config_toml(secret=[SECRET], listen="127.0.0.1:1") + "\n[cache]\nmax_bytes = 1000\nmax_ttl = 60\n"
    path.write_text(changed + '\n[jobs]\nenabled = true\npublic_url = "https://app.example"\npoll_interval = 2.0\n')
    with watch_logs() as logs:
        assert running.parkway.reload() == []

    (warning,) = logs.find(event="config_reload_needs_restart")
    assert warning["keys"] == ["server.listen", "cache.max_bytes", "cache.max_ttl", "jobs.enabled"]
    config = running.parkway.config
    assert config.cache.max_bytes != 1000 and not config.jobs.enabled  # the old values stay
    assert config.jobs.poll_interval == 2.0  # read live by the job runner: applied
