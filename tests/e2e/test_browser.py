"""The browser example in a real headless Chromium, driven over the DevTools Protocol.

examples/browser/backend.py serves the page and signs; Parkway and an in-test upstream do
the rest. The upstream sends the first tokens, then holds the stream open until the test
releases it: while it is held, the page must already show those tokens (it is rendering the
stream as it arrives, not at the end); once released, it must show the whole answer.
The page reports each rendered token through a CDP binding (``window.parkwayReport``), so the
test waits on events from the browser instead of sleeping.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from support.processes import READY_TIMEOUT, ROOT, require_binary, stop_process
from support.upstream import SSE_HEADERS, Exchange, Upstream
from support.websocket import RealtimeUpstream

WAIT = 8.0  # bound on each wait for the browser (Chromium's first start is the slowest step)


def _load_backend():
    """examples/browser/backend.py as a module (examples/ is not a package)."""
    path = ROOT / "examples" / "browser" / "backend.py"
    spec = importlib.util.spec_from_file_location("browser_example_backend", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


backend = _load_backend()

TOKENS = ["Parkway", " relays", " each", " token", " the", " moment", " it", " arrives", "."]
HELD_AFTER = 4  # tokens sent before the upstream waits for the test


def completion_chunk(token: str) -> bytes:
    payload = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def held_completion(release: trio.Event, finished: trio.Event) -> Callable[[Exchange], Any]:
    """An OpenAI-style SSE answer that stops after ``HELD_AFTER`` tokens until ``release``."""

    async def behaviour(ex: Exchange) -> None:
        await ex.send_head(200, SSE_HEADERS)
        for i, token in enumerate(TOKENS):
            if i == HELD_AFTER:
                await release.wait()
            await ex.send_data(completion_chunk(token))
        await ex.send_data(b"data: [DONE]\n\n")
        await ex.send_end()
        finished.set()

    return behaviour


# --- Chromium over the DevTools Protocol ---------------------------------------------------------


class PageSession:
    """One CDP session on a page target: commands, and the page's ``parkwayReport`` calls."""

    def __init__(self, ws: WebSocketConnection):
        self._ws = ws
        self._ids = itertools.count(1)
        self._replies: dict[int, dict] = {}
        self._waiting: dict[int, trio.Event] = {}
        self._reports_in, self._reports = trio.open_memory_channel[dict](math.inf)
        self.console: list[str] = []  # page console output and exceptions, for failure messages

    async def read_messages(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                message = json.loads(await self._ws.get_message())
            except ConnectionClosed:
                return
            if "id" in message:
                self._replies[message["id"]] = message
                self._waiting.pop(message["id"]).set()
            elif message.get("method") == "Runtime.bindingCalled" and message["params"]["name"] == "parkwayReport":
                self._reports_in.send_nowait(json.loads(message["params"]["payload"]))
            elif message.get("method") == "Runtime.consoleAPICalled":
                self.console.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in message["params"]["args"])
                )
            elif message.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(message["params"]["exceptionDetails"])[:500])

    async def call(self, method: str, **params: Any) -> dict:
        command_id = next(self._ids)
        self._waiting[command_id] = done = trio.Event()
        await self._ws.send_message(json.dumps({"id": command_id, "method": method, "params": params}))
        await done.wait()
        reply = self._replies.pop(command_id)
        assert "error" not in reply, f"{method} failed: {reply['error']}"
        return reply["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def report(self, accept: Callable[[dict], bool]) -> dict:
        """The next report ``accept`` takes; a page error in between fails the test."""
        while True:
            entry = await self._reports.receive()
            if accept(entry):
                return entry
            assert entry["kind"] != "error", f"the page showed an error: {entry['message']}\n{self.console}"


async def _devtools_port(profile: Path, proc: trio.Process) -> int:
    """Chromium writes its DevTools port into the profile once it listens."""
    port_file = profile / "DevToolsActivePort"
    with trio.fail_after(READY_TIMEOUT):
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, f"chromium exited with status {proc.returncode}"
            await trio.sleep(0.05)  # an external process: polling its file is the signal
    return int(port_file.read_text().split()[0])


@asynccontextmanager
async def chromium_page(tmp_path: Path) -> AsyncIterator[PageSession]:
    """Headless Chromium on about:blank; yields a CDP session on its page, stops it afterwards."""
    chromium = require_binary("chromium")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    with open(tmp_path / "chromium.log", "wb") as log:
        # Its own process group, so the renderer and helper processes go with it.
        proc = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        try:
            port = await _devtools_port(profile, proc)
            async with httpx.AsyncClient(trust_env=False, timeout=WAIT) as client:
                with trio.fail_after(READY_TIMEOUT):
                    while not (
                        pages := [
                            t
                            for t in (await client.get(f"http://127.0.0.1:{port}/json/list")).json()
                            if t["type"] == "page"
                        ]
                    ):
                        await trio.sleep(0.05)
            async with open_websocket_url(pages[0]["webSocketDebuggerUrl"]) as ws, trio.open_nursery() as nursery:
                session = PageSession(ws)
                await nursery.start(session.read_messages)
                yield session
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(proc)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group we started
                except ProcessLookupError:
                    pass


async def open_page(session: PageSession, url: str) -> None:
    await session.call("Runtime.enable")
    await session.call("Runtime.addBinding", name="parkwayReport")
    await session.call("Page.enable")
    await session.call("Page.navigate", url=url)
    await session.report(lambda r: r["kind"] == "ready")


async def text_of(session: PageSession, element_id: str) -> str:
    return await session.evaluate(f"document.getElementById({element_id!r}).textContent")


# --- tests -------------------------------------------------------------------------------------------


@pytest.fixture
async def start_example(nursery: trio.Nursery, upstream: Upstream) -> AsyncIterator[Callable[..., Any]]:
    """Factory for examples/browser/backend.py's servers, pointed at the in-test upstream;
    drained (not cancelled) at teardown so no listening socket is leaked."""
    started = []

    async def start(**kwargs: Any):
        example = await nursery.start(partial(backend.serve_example, upstream_url=upstream.base, **kwargs))
        started.append(example)
        return example

    yield start
    for example in started:
        example.stop()
    with trio.fail_after(WAIT):
        for example in started:
            await example.stopped.wait()


async def test_page_renders_the_stream_token_by_token(start_example, upstream: Upstream, tmp_path: Path) -> None:
    release, finished = trio.Event(), trio.Event()
    upstream.behaviour = held_completion(release, finished)
    example = await start_example()
    async with chromium_page(tmp_path) as page:
        with trio.fail_after(WAIT):
            await open_page(page, example.page_url)
            await page.evaluate(
                "document.getElementById('prompt').value = 'Hello, Parkway?';document.getElementById('send').click()"
            )
            partial_text = "".join(TOKENS[:HELD_AFTER])
            await page.report(lambda r: r["kind"] == "token" and r["length"] == len(partial_text))
        # The upstream is holding the rest back: what the page shows now, it showed mid-stream.
        assert not finished.is_set()
        assert await text_of(page, "output") == partial_text
        assert await page.evaluate("window.parkwayProgress.done") is False
        release.set()
        with trio.fail_after(WAIT):
            await page.report(lambda r: r["kind"] == "done")
        assert finished.is_set()
        assert await text_of(page, "output") == "".join(TOKENS)
        snapshots = await page.evaluate("window.parkwayProgress.snapshots")
        assert [s["length"] for s in snapshots] == list(itertools.accumulate(len(t) for t in TOKENS))
        assert "first token after" in await text_of(page, "status")
    (request,) = upstream.requests
    assert request.path == "/v1/chat/completions"
    # The example's key, added by Parkway: the page and its backend never had it.
    assert request.headers["authorization"].startswith("Bearer sk-example-")
    assert json.loads(request.body)["messages"] == [{"role": "user", "content": "Hello, Parkway?"}]


async def test_page_shows_parkways_refusal(start_example, upstream: Upstream, tmp_path: Path) -> None:
    # Parkway's clock is an hour ahead, so the URL the backend just signed has expired.
    example = await start_example(parkway_clock=lambda: datetime.now(UTC) + timedelta(hours=1))
    async with chromium_page(tmp_path) as page:
        with trio.fail_after(WAIT):
            await open_page(page, example.page_url)
            await page.evaluate("document.getElementById('send').click()")
            entry = await page.report(lambda r: r["kind"] in ("error", "done"))
        assert entry["kind"] == "error"
        # Readable only because Parkway's error carries CORS headers for the page's origin.
        assert entry["message"].startswith("Parkway said 403 expired: signed URL expired at ")
        assert await text_of(page, "error") == entry["message"]
    assert upstream.requests == []


# --- the realtime page: a WebSocket on a signed URL ----------------------------------------------------

REALTIME_KEY = "sk-example-realtime-key-5150"


async def test_realtime_page_talks_both_ways_and_never_sees_the_key(
    start_example, nursery: trio.Nursery, tmp_path: Path
) -> None:
    realtime = await nursery.start(RealtimeUpstream(key=REALTIME_KEY).serve)
    example = await start_example(realtime_url=f"ws://127.0.0.1:{realtime.port}", api_key=REALTIME_KEY)
    reports: list[dict] = []
    async with chromium_page(tmp_path) as page:
        with trio.fail_after(WAIT):
            await open_page(page, example.page_url + "realtime.html")
            await page.evaluate("document.getElementById('start').click()")
            opened = await page.report(lambda r: r["kind"] in ("open", "closed"))
            assert opened == {"kind": "open", "protocol": "realtime"}
            # Until both the binary echo and response.done are in (their order is the upstream's).
            while not ({"binary", "response.done"} <= {r.get("type", r["kind"]) for r in reports}):
                entry = await page.report(lambda r: r["kind"] in ("event", "binary", "closed"))
                assert entry["kind"] != "closed", entry
                reports.append(entry)
            await page.evaluate("document.getElementById('close').click()")
            closed = await page.report(lambda r: r["kind"] == "closed")
            page_text = await page.evaluate(
                "document.documentElement.outerHTML + JSON.stringify(performance.getEntries().map(e => e.name))"
            )
        session = await realtime.wait_session()
        with trio.fail_after(WAIT):
            await session.ended.wait()
    # Messages both ways: the page's text and binary message reached the upstream ...
    assert json.loads(session.received[0])["type"] == "response.create"
    assert session.received[1] == b"PK\x00\xff"
    # ... and the upstream's events and the binary echo reached the page.
    assert [r["bytes"] for r in reports if r["kind"] == "binary"] == [[80, 75, 0, 255]]
    events = [r for r in reports if r["kind"] == "event"]
    assert events[0]["type"] == "session.created" and events[-1]["type"] == "response.done"
    assert events[-1]["usage"]["output_tokens"] == 7
    # The page closed with an application code; the upstream got it as sent.
    assert (closed["code"], session.close.code, session.close.reason) == (4001, 4001, "user closed the page")
    # Parkway added the key; nothing the page had or received contains it.
    assert session.headers["authorization"] == f"Bearer {REALTIME_KEY}"
    assert REALTIME_KEY not in page_text and REALTIME_KEY not in json.dumps([opened, *reports, closed])
    assert "5150" not in page_text


async def test_a_cached_stream_renders_token_by_token(start_example, upstream: Upstream, tmp_path: Path) -> None:
    """The second identical call is answered from Parkway's cache, replayed paced like the original:
    the page renders it token by token, with the original's pause in the middle, and the upstream
    is called once."""
    release, finished = trio.Event(), trio.Event()
    upstream.behaviour = held_completion(release, finished)
    example = await start_example(cache_ttl=600, cache_replay="paced")
    partial_text = "".join(TOKENS[:HELD_AFTER])
    pause = 1.0  # the original stream's pause after HELD_AFTER tokens: the replay keeps it
    async with chromium_page(tmp_path) as page:
        with trio.fail_after(WAIT):
            await open_page(page, example.page_url)
            await page.evaluate(
                "document.getElementById('prompt').value = 'Cache me';document.getElementById('send').click()"
            )
            await page.report(lambda r: r["kind"] == "token" and r["length"] == len(partial_text))
        await trio.sleep(pause)  # the data's own timing, recorded with the entry: not a synchronisation
        release.set()
        with trio.fail_after(WAIT):
            await page.report(lambda r: r["kind"] == "done")
            # Again, the same prompt: a hit.
            await page.evaluate("document.getElementById('send').click()")
            await page.report(lambda r: r["kind"] == "token" and r["length"] == len(partial_text))
        # Mid-replay: the page shows the first tokens while the cache is still pacing the rest.
        assert await text_of(page, "output") == partial_text
        assert await page.evaluate("window.parkwayProgress.done") is False
        with trio.fail_after(WAIT + pause):
            await page.report(lambda r: r["kind"] == "done")
        assert await text_of(page, "output") == "".join(TOKENS)
        snapshots = await page.evaluate("window.parkwayProgress.snapshots")
        assert [s["length"] for s in snapshots] == list(itertools.accumulate(len(t) for t in TOKENS))
        gap_ms = snapshots[HELD_AFTER]["t"] - snapshots[HELD_AFTER - 1]["t"]
        assert gap_ms >= 0.9 * pause * 1000
    assert len(upstream.requests) == 1
