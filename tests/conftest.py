"""Fixtures for end-to-end tests: an in-test upstream, Parkway on a real socket, a browser.

Everything runs in the test's own nursery (pytest-trio's ``nursery`` fixture), so it is
cancelled when the test ends; ``hang_guard`` turns a hung test into a failure.
"""

from __future__ import annotations

import gc
import select
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import support.parkway
from support.parkway import Parkways, RunningParkway, make_config
from support.processes import ProcessGroup
from support.redis import RedisServer
from support.upstream import Upstream

HANG_LIMIT = 10.0  # seconds; the whole e2e file takes a few


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "hang_limit(seconds): the hang_guard limit of one slow test")


def pytest_sessionstart(session: pytest.Session) -> None:
    """No automatic collections while the thousands of test items are built (a dozen full ones,
    each slower than the last as the heap grows): their garbage is collected once, below."""
    gc.disable()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection built (modules, items, Hypothesis strategies) out of every later
    collection, as Parkway's own ``settle_heap`` does at start-up. The fixtures below collect after
    each test so that what a test leaked warns in that test; with ~200,000 objects frozen, each
    such collection scans only what the tests made since (milliseconds, not a third of a second)."""
    gc.collect()
    gc.freeze()
    gc.enable()


@pytest.fixture
async def hang_guard(nursery: trio.Nursery, request: pytest.FixtureRequest) -> None:
    """Fail (instead of hanging forever) a test that runs longer than ``HANG_LIMIT``
    (a test module may set its own ``HANG_LIMIT``, one test ``@pytest.mark.hang_limit(s)``)."""
    marker = request.node.get_closest_marker("hang_limit")
    limit = marker.args[0] if marker else getattr(request.module, "HANG_LIMIT", HANG_LIMIT)

    async def watchdog() -> None:
        await trio.sleep(limit)
        raise TimeoutError(f"test still running after {limit:g} s: something hung")

    nursery.start_soon(watchdog)


@pytest.fixture
async def processes(nursery: trio.Nursery) -> AsyncIterator[ProcessGroup]:
    """Subprocesses started by a test (``python -m proxy serve`` ...), cleaned up after it."""
    group = ProcessGroup(nursery)
    yield group
    await group.cleanup()


@pytest.fixture(params=["epoll", "portable"])
def relay_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on each of the relay's drivers (proxy.relay.engine): the epoll engine and the
    portable one; Parkways started by the test read ``PARKWAY_RELAY``."""
    if request.param == "epoll" and not hasattr(select, "epoll"):
        pytest.skip("no epoll on this platform")
    monkeypatch.setenv("PARKWAY_RELAY", request.param)
    return str(request.param)


@pytest.fixture(params=["h11", "httptools"])
def http_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on each HTTP/1.1 implementation (``[server] http``: the client face's head
    parser and the upstream face, proxy.upstream.wire): Parkways the test starts from
    ``make_config`` use it unless the test names another."""
    pytest.importorskip(request.param)
    monkeypatch.setattr(support.parkway, "TEST_SERVER", replace(support.parkway.TEST_SERVER, http=request.param))
    return str(request.param)


@pytest.fixture
def contain_crashes() -> Iterator[None]:
    """Report what a crashed Parkway leaked (sockets, async generators) against its own test.

    pytest keeps the last failure in ``sys.last_value``; its traceback holds the crashed
    tasks' frames, so their ResourceWarnings would otherwise surface in a later test.
    """
    yield
    sys.last_type = sys.last_value = sys.last_traceback = None
    if hasattr(sys, "last_exc"):
        sys.last_exc = None
    gc.collect()


@pytest.fixture
async def upstream(nursery: trio.Nursery, hang_guard: None, contain_crashes: None) -> Upstream:
    """The in-test upstream (echo by default; set ``upstream.behaviour`` to change it)."""
    return await nursery.start(Upstream().serve)


@pytest.fixture
async def start_parkway(
    nursery: trio.Nursery, hang_guard: None, contain_crashes: None
) -> AsyncIterator[Callable[..., Awaitable[RunningParkway]]]:
    """Factory: ``await start_parkway(credentials=..., cors=..., **server_overrides)``;
    each Parkway is drained at teardown (``Parkways.drain``)."""
    parkways = Parkways(nursery)

    async def start(**overrides: Any) -> RunningParkway:
        return await parkways.start(make_config(**overrides))

    yield start
    await parkways.drain()
    # Collect while Trio still runs, so an async generator Parkway abandoned unexhausted
    # always raises its ResourceWarning here, not only when a collection happens to run.
    gc.collect()


@pytest.fixture
async def parkway(start_parkway: Callable[..., Awaitable[RunningParkway]]) -> RunningParkway:
    """Parkway with the test config: credential "app" / "s3cret", injecting the upstream key."""
    return await start_parkway()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """The browser: no proxies from the environment, short timeouts."""
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        yield client


@pytest.fixture
async def redis(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A real redis-server on loopback for this test, killed after it."""
    server = RedisServer(nursery, tmp_path)
    with trio.fail_after(10):
        await server.start()
    yield server
    await server.kill()
    gc.collect()  # a leaked connection's warnings belong to this test, not a later one
