"""Operating Parkway: the admin listener, metrics after real traffic, hot reload, secret
rotation, and signals sent to a real ``parkway serve`` process.

Most tests run Parkway in the test's nursery with an admin listener on port 0; the signal
tests start ``python -m proxy serve --config FILE`` as a process, on ports found free by
binding port 0 first, and follow its JSON log on stderr.

Rotating a credential's secret without downtime (``test_secret_rotation_without_downtime``
follows it step by step):

1. Add the new secret beside the old one, e.g.
   ``secret_env = ["PARKWAY_APP_SECRET", "PARKWAY_APP_SECRET_NEXT"]``, and reload (SIGHUP,
   ``parkway reload``, or ``POST /reload`` on the admin listener). A URL signed with either
   secret verifies from then on; a broken file is refused and the running config kept.
2. Move the signers (the web backend) over to the new secret.
3. When the URLs already handed out with the old secret have expired (their
   ``X-Sw-Expires``), remove the old secret and reload again; the old one is then refused.

Requests in flight keep the configuration they started with, so no stream is cut by any step.
"""

from __future__ import annotations

import gc
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import structlog
import trio
import trio.testing

from proxy.app import Parkway
from proxy.cli import main as cli_main
from proxy.config import AdminConfig, Config, Credential, load_config
from proxy.demo.mock_openai import MockOpenAI, serve_mock
from support.http import exchange, send_raw
from support.logs import watch_logs
from support.metrics import scrape
from support.parkway import TEST_SERVER, Parkways, RunningParkway, config_toml
from support.processes import ProcessGroup, free_port, wait_until_refused
from support.signing import INJECTED, SECRET, UPSTREAM_KEY, sign
from support.upstream import SSE_HEADERS, Exchange, Upstream, echo, sse_from

pytestmark = pytest.mark.usefixtures("hang_guard")

EVENT_1 = b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
EVENT_2 = b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\ndata: [DONE]\n\n'
SECRET_A = "secret-A-first"
SECRET_B = "secret-B-second"


# --- fixtures and small helpers ---------------------------------------------------------------------


@pytest.fixture
async def start_operable(
    nursery: trio.Nursery, hang_guard: None, contain_crashes: None
) -> AsyncIterator[Callable[..., Awaitable[RunningParkway]]]:
    """Factory: ``await start_operable(config, config_path=None)``; drained at teardown."""
    parkways = Parkways(nursery)

    async def start(config: Config, config_path: Path | None = None) -> RunningParkway:
        return await parkways.start(Parkway(config, config_path=config_path))

    yield start
    await parkways.drain()
    gc.collect()


def admin_config(**server_overrides) -> Config:
    return Config(
        server=replace(TEST_SERVER, **server_overrides),
        credentials=(Credential("app", (SECRET,), INJECTED),),
        admin=AdminConfig(listen=("127.0.0.1:0",)),
    )


def admin_url(running: RunningParkway, path: str) -> str:
    return f"http://{running.parkway.admin_addresses[0]}{path}"


class Streams:
    """Upstream behaviour: ``/v1/stream/<name>`` is SSE paced by the test, anything else echoes."""

    def __init__(self) -> None:
        self._channels: dict[str, trio.MemoryReceiveChannel[bytes]] = {}

    def open(self, name: str) -> trio.MemorySendChannel[bytes]:
        send, receive = trio.open_memory_channel[bytes](0)
        self._channels[name] = receive
        return send

    async def __call__(self, ex: Exchange) -> None:
        if ex.request.path.startswith("/v1/stream/"):
            await sse_from(self._channels.pop(ex.request.path.removeprefix("/v1/stream/")))(ex)
        else:
            await echo(ex)


class InFlight:
    """A streamed response the test reads piece by piece."""

    def __init__(self, chunks: AsyncIterator[bytes]):
        self.chunks = chunks
        self.got = b""

    async def read_at_least(self, size: int) -> None:
        with trio.fail_after(5):
            while len(self.got) < size:
                self.got += await self.chunks.__anext__()

    async def read_to_end(self) -> bytes:
        with trio.fail_after(5):
            async for chunk in self.chunks:
                self.got += chunk
        return self.got


@asynccontextmanager
async def stream_through(client: httpx.AsyncClient, url: str) -> AsyncIterator[InFlight]:
    async with client.stream("POST", url, json={"stream": True}) as response, aclosing(response.aiter_raw()) as chunks:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        yield InFlight(chunks)


async def start_stream(send: trio.MemorySendChannel[bytes], flight: InFlight) -> None:
    """The upstream sends EVENT_1 and the client has read it: the stream is in flight."""
    with trio.fail_after(5):
        await send.send(EVENT_1)
    await flight.read_at_least(len(EVENT_1))
    assert flight.got == EVENT_1


async def finish_stream(send: trio.MemorySendChannel[bytes], flight: InFlight) -> None:
    with trio.fail_after(5):
        await send.send(EVENT_2)
    await send.aclose()
    assert await flight.read_to_end() == EVENT_1 + EVENT_2


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


# --- admin endpoints --------------------------------------------------------------------------------


async def test_health_readiness_and_unknown_admin_paths(start_operable, client):
    running = await start_operable(admin_config())

    health = await client.get(admin_url(running, "/healthz"))
    ready = await client.get(admin_url(running, "/readyz"))
    unknown = await client.get(admin_url(running, "/nope"))
    wrong_method = await client.post(admin_url(running, "/healthz"))
    reload_by_get = await client.get(admin_url(running, "/reload"))
    metrics = await client.get(admin_url(running, "/metrics"))
    public = await client.get(f"{running.base}/healthz")

    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (
        200,
        {"ready": True, "checks": {"accepting": True, "config_loaded": True}},
    )
    for response in (unknown, wrong_method, reload_by_get):
        assert response.status_code == 404
        assert error_code(response) == "not_found"
    assert "/nope" in unknown.json()["error"]["message"]
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=")
    assert "# TYPE parkway_requests_total counter" in metrics.text
    # The admin endpoints are not on the public listener: there /healthz is just an unsigned URL.
    assert public.status_code == 400 and error_code(public) == "missing_signature_params"


async def test_admin_answers_head_requests_with_heads(start_operable, client):
    # A HEAD is answered as GET without the body, an unknown path too (issue 18, harm 2).
    running = await start_operable(admin_config())

    health = await client.head(admin_url(running, "/healthz"))
    unknown = await client.head(admin_url(running, "/nope"))
    after = await client.get(admin_url(running, "/healthz"))

    assert (health.status_code, health.content) == (200, b"")
    assert (unknown.status_code, unknown.content) == (404, b"")
    assert int(unknown.headers["content-length"]) > 0
    assert after.status_code == 200


async def test_readyz_is_503_once_shutdown_began_while_a_stream_still_drains(start_operable, upstream, client):
    running = await start_operable(admin_config(drain_timeout=5.0))
    streams = Streams()
    upstream.behaviour = streams
    send = streams.open("drain")
    url = running.sign(f"{upstream.base}/v1/stream/drain", method="POST")

    async with send, stream_through(client, url) as flight:
        await start_stream(send, flight)
        assert (await client.get(admin_url(running, "/readyz"))).status_code == 200

        running.parkway.shutdown()
        await trio.testing.wait_all_tasks_blocked()
        # The stream keeps the drain open; a load balancer asking now must hear "not ready".
        async with httpx.AsyncClient(trust_env=False, timeout=5.0) as prober:
            try:
                ready = await prober.get(admin_url(running, "/readyz"))
            except httpx.TransportError as exc:  # kept to assert on once the stream is finished
                ready = exc

        await finish_stream(send, flight)
    with trio.fail_after(5):
        await running.stopped.wait()

    assert isinstance(ready, httpx.Response), f"admin listener gone while draining: {ready!r}"
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "checks": {"accepting": False, "config_loaded": True}}


# --- metrics ----------------------------------------------------------------------------------------

USAGE_STREAM = [  # the usage object cut across two chunks, as a network may cut it
    EVENT_1,
    b'data: {"choices":[],"usage":{"prompt_tokens":11,',
    b'"completion_tokens":2,"total_tokens":13}}\n\n',
    b"data: [DONE]\n\n",
]
MOCK_TEXT = "alpha beta gamma delta"  # MockOpenAI: 9 prompt tokens, one completion token per word


async def usage_stream(ex: Exchange) -> None:
    await ex.send_head(200, SSE_HEADERS)
    for chunk in USAGE_STREAM:
        await ex.send_data(chunk)
    await ex.send_end()


async def test_metrics_match_the_traffic_sent(start_operable, upstream, nursery, client):
    running = await start_operable(admin_config())
    mock = await nursery.start(serve_mock, MockOpenAI(api_key=UPSTREAM_KEY, delay=0, text=MOCK_TEXT))
    upstream.behaviour = lambda ex: usage_stream(ex) if ex.request.path == "/v1/stream" else echo(ex)
    exchanges = []

    async def send(method, url, body=b"", *, expect, code=None):
        result = await exchange(running.port, method, url, body, [("content-type", "application/json")])
        assert result.status == expect, result.body
        if code is not None:
            assert result.json()["error"]["code"] == code
        exchanges.append(result)
        return result

    def chat(stream: bool) -> bytes:
        request = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        if stream:
            request["stream_options"] = {"include_usage": True}
        return json.dumps(request).encode()

    with watch_logs() as logs:
        for i in range(3):
            await send("GET", running.sign(f"{upstream.base}/v1/models?i={i}"), expect=200)
        streamed = await send("POST", running.sign(f"{upstream.base}/v1/stream", method="POST"), b"{}", expect=200)
        completions = running.sign(f"{mock}/v1/chat/completions", method="POST")
        mock_stream = await send("POST", completions, chat(stream=True), expect=200)
        mock_json = await send("POST", completions, chat(stream=False), expect=200)
        for _ in range(2):
            await send(
                "GET", running.sign(f"{upstream.base}/v1/models", secret="wrong"), expect=403, code="signature_mismatch"
            )
        await send(
            "GET", running.sign(f"{upstream.base}/v1/models", id="stranger"), expect=401, code="unknown_credential"
        )
        await send("GET", f"{running.base}/v1/models", expect=400, code="missing_signature_params")
        long_ago = datetime.now(UTC) - timedelta(hours=1)
        await send("GET", running.sign(f"{upstream.base}/v1/models", when=long_ago), expect=403, code="expired")
        await send(
            "GET", running.sign(f"http://127.0.0.1:{free_port()}/v1/models"), expect=502, code="upstream_connect_failed"
        )
        metrics = await scrape(client, running.parkway.admin_addresses[0])

    # What the client received is what the upstream sent: accounting did not touch the stream.
    (upstream_stream,) = [ex for ex in upstream.exchanges if ex.request.path == "/v1/stream"]
    assert streamed.body == bytes(upstream_stream.sent_body) == b"".join(USAGE_STREAM)
    assert mock_stream.headers["content-type"] == "text/event-stream"
    events = [json.loads(line[6:]) for line in mock_stream.body.split(b"\n\n") if line.startswith(b"data: {")]
    assert events[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == MOCK_TEXT
    assert mock_stream.body.endswith(b"data: [DONE]\n\n")
    assert mock_json.json()["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}

    assert metrics.by("parkway_requests_total", "credential", "status_class", "outcome") == {
        ("app", "2xx", "ok"): 6,
        ("app", "4xx", "refused:signature_mismatch"): 2,
        ("unknown", "4xx", "refused:unknown_credential"): 1,
        ("none", "4xx", "refused:missing_signature_params"): 1,
        ("app", "4xx", "refused:expired"): 1,
        ("app", "5xx", "upstream_error"): 1,
    }
    assert metrics.by("parkway_refusals_total", "reason") == {
        ("signature_mismatch",): 2,
        ("unknown_credential",): 1,
        ("missing_signature_params",): 1,
        ("expired",): 1,
    }
    assert metrics.by("parkway_upstream_errors_total", "kind") == {("upstream_connect_failed",): 1}
    # Unknown ids never become label values: cardinality stays bounded.
    assert "stranger" not in metrics.label_values("credential")

    total = len(exchanges)
    assert total == 12
    assert metrics.value("parkway_request_duration_seconds_count") == total
    assert metrics.value("parkway_request_duration_seconds_bucket", le="+Inf") == total
    # Only requests that reached the upstream and got its head have a first-byte time.
    assert metrics.value("parkway_upstream_ttfb_seconds_count") == 6
    assert metrics.value("parkway_added_latency_seconds_count") == 6
    assert metrics.value("parkway_client_bytes_total", direction="in") >= sum(e.sent for e in exchanges)
    assert metrics.value("parkway_client_bytes_total", direction="out") >= sum(e.received for e in exchanges)
    assert metrics.by("parkway_tokens_total", "credential", "kind") == {
        ("app", "prompt"): 11 + 9 + 9,
        ("app", "completion"): 2 + 4 + 4,
    }
    assert metrics.value("parkway_streams_in_flight") == 0
    assert metrics.value("parkway_open_connections") == 0

    # The request log lines agree, and carry the token usage.
    lines = logs.find(event="request")
    assert len(lines) == total
    (stream_line,) = logs.find(event="request", upstream_path="/v1/stream")
    assert (stream_line["prompt_tokens"], stream_line["completion_tokens"]) == (11, 2)
    mock_lines = logs.find(event="request", upstream_path="/v1/chat/completions")
    assert [(e["prompt_tokens"], e["completion_tokens"]) for e in mock_lines] == [(9, 4), (9, 4)]
    assert sum(e["bytes_out"] for e in lines) == sum(e.received for e in exchanges)
    assert all(
        "prompt_tokens" not in e
        for e in lines
        if e.get("upstream_path") != "/v1/chat/completions" and e.get("upstream_path") != "/v1/stream"
    )


async def test_malformed_requests_are_counted_like_every_other_request(start_operable, client):
    running = await start_operable(admin_config())

    sent, raw = await send_raw(running.port, b"GARBAGE\r\n\r\n")
    metrics = await scrape(client, running.parkway.admin_addresses[0])

    assert raw.startswith(b"HTTP/1.1 400 ")
    assert metrics.by("parkway_requests_total", "credential", "status_class", "outcome") == {
        ("none", "4xx", "refused:malformed_http"): 1
    }
    assert metrics.by("parkway_refusals_total", "reason") == {("malformed_http",): 1}
    # The histogram and the byte counters see the same requests as parkway_requests_total.
    seen = {
        "duration_count": metrics.value("parkway_request_duration_seconds_count"),
        "bytes_in_counted": metrics.value("parkway_client_bytes_total", direction="in") >= sent,
        "bytes_out_counted": metrics.value("parkway_client_bytes_total", direction="out") >= len(raw),
    }
    assert seen == {"duration_count": 1, "bytes_in_counted": True, "bytes_out_counted": True}


# --- hot reload -------------------------------------------------------------------------------------


async def reload_by(how: str, running: RunningParkway, client: httpx.AsyncClient, capsys) -> list[str]:
    """Ask ``running`` to reload its file the way an operator would; return the problems reported."""
    if how == "method":
        return running.parkway.reload()
    if how == "admin":
        response = await client.post(admin_url(running, "/reload"))
        body = response.json()
        assert response.status_code == (200 if body["reloaded"] else 400), body
        assert body["reloaded"] == (not body.get("problems"))
        return body.get("problems", [])
    assert how == "cli"
    capsys.readouterr()
    # `parkway reload` uses a blocking client: run it in a thread, the admin listener is ours.
    address = running.parkway.admin_addresses[0]
    with trio.fail_after(10):
        code = await trio.to_thread.run_sync(cli_main, ["reload", "--admin", address])
    out, err = capsys.readouterr()
    if code == 0:
        assert out == "reloaded\n" and err == ""
        return []
    assert code == 1
    assert err.endswith("reload refused; the running configuration is unchanged\n")
    return err.splitlines()[:-1]


async def start_from_file(start_operable, path: Path) -> RunningParkway:
    return await start_operable(load_config(path), config_path=path)


@pytest.mark.parametrize("how", ["method", "admin", "cli"])
async def test_reload_applies_to_new_requests_and_spares_the_stream_in_flight(
    start_operable, upstream, client, tmp_path, capsys, how
):
    path = tmp_path / "parkway.toml"
    path.write_text(config_toml(secret=[SECRET_A]))
    running = await start_from_file(start_operable, path)
    streams = Streams()
    upstream.behaviour = streams
    send = streams.open("long")

    with watch_logs() as logs:
        async with (
            send,
            stream_through(
                client, running.sign(f"{upstream.base}/v1/stream/long", method="POST", secret=SECRET_A)
            ) as flight,
        ):
            await start_stream(send, flight)

            path.write_text(config_toml(secret=[SECRET_B]))
            assert await reload_by(how, running, client, capsys) == []

            old = await client.get(running.sign(f"{upstream.base}/v1/models", secret=SECRET_A))
            new = await client.get(running.sign(f"{upstream.base}/v1/models", secret=SECRET_B))
            assert (old.status_code, error_code(old)) == (403, "signature_mismatch")
            assert new.status_code == 200

            # Signed with A and started before the reload: it completes in full.
            await finish_stream(send, flight)
        with trio.fail_after(5):
            first = await logs.wait_for(event="request", upstream_path="/v1/stream/long")

    assert bytes(upstream.exchanges[0].sent_body) == EVENT_1 + EVENT_2
    (reloaded,) = logs.find(event="config_reloaded")
    assert reloaded["credentials"] == ["app"]
    assert (first["outcome"], first["status"]) == ("ok", 200)
    metrics = await scrape(client, running.parkway.admin_addresses[0])
    assert metrics.by("parkway_config_reloads_total", "result") == {("ok",): 1}


BROKEN_FILES = {
    "invalid-toml": ("[server\nlisten = ", "invalid TOML"),
    "unknown-key": (
        config_toml(secret=[SECRET_B], extra_server="listen_adress = '127.0.0.1:1'"),
        "server.listen_adress",
    ),
    "unset-secret-env": (
        config_toml(secret_env=["PARKWAY_TEST_UNSET_SECRET"]),
        "environment variable PARKWAY_TEST_UNSET_SECRET is not set",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
async def test_broken_reload_keeps_the_running_config(
    start_operable, upstream, client, tmp_path, capsys, monkeypatch, case
):
    monkeypatch.delenv("PARKWAY_TEST_UNSET_SECRET", raising=False)
    text, expected = BROKEN_FILES[case]
    path = tmp_path / "parkway.toml"
    path.write_text(config_toml(secret=[SECRET_A]))
    running = await start_from_file(start_operable, path)
    path.write_text(text)

    with watch_logs() as logs:
        reports = {how: await reload_by(how, running, client, capsys) for how in ("method", "admin", "cli")}
        old = await client.get(running.sign(f"{upstream.base}/v1/models", secret=SECRET_A))
        new = await client.get(running.sign(f"{upstream.base}/v1/models", secret=SECRET_B))

    for how, problems in reports.items():
        assert problems and any(expected in p for p in problems), (how, problems)
    assert reports["method"] == reports["admin"] == reports["cli"]
    failures = logs.find(event="config_reload_failed")
    assert len(failures) == 3
    assert all(f["problems"] == reports["method"] and f["log_level"] == "error" for f in failures)
    assert not logs.find(event="config_reloaded")
    # The old config keeps serving: A still verifies, and nothing of the broken file applies.
    assert old.status_code == 200
    assert new.status_code == 403
    assert running.parkway.config.credential("app").secrets == (SECRET_A,)
    metrics = await scrape(client, running.parkway.admin_addresses[0])
    assert metrics.by("parkway_config_reloads_total", "result") == {("error",): 3}

    # Once the file is fixed, the next reload takes it.
    path.write_text(config_toml(secret=[SECRET_B]))
    assert running.parkway.reload() == []
    assert (await client.get(running.sign(f"{upstream.base}/v1/models", secret=SECRET_B))).status_code == 200


async def test_reload_without_a_file_is_refused(start_operable, client):
    running = await start_operable(admin_config())

    with watch_logs() as logs:
        response = await client.post(admin_url(running, "/reload"))

    assert response.status_code == 400
    assert response.json()["reloaded"] is False
    assert "no configuration file" in response.json()["problems"][0]
    assert logs.find(event="config_reload_failed")


async def test_secret_rotation_without_downtime(start_operable, upstream, client, tmp_path, monkeypatch):
    """The procedure in this module's docstring, with streams in flight across every step."""
    monkeypatch.setenv("PARKWAY_TEST_SECRET", SECRET_A)
    monkeypatch.delenv("PARKWAY_TEST_SECRET_NEXT", raising=False)
    path = tmp_path / "parkway.toml"
    path.write_text(config_toml(secret_env=["PARKWAY_TEST_SECRET"]))
    running = await start_from_file(start_operable, path)
    streams = Streams()
    upstream.behaviour = streams
    send_old, send_new = streams.open("old"), streams.open("new")

    async def status(secret: str) -> int:
        return (await client.get(running.sign(f"{upstream.base}/v1/models", secret=secret))).status_code

    def stream_signed_with(secret: str, name: str):
        return stream_through(client, running.sign(f"{upstream.base}/v1/stream/{name}", method="POST", secret=secret))

    assert (await status(SECRET_A), await status(SECRET_B)) == (200, 403)
    with watch_logs() as logs:
        async with send_old, send_new, stream_signed_with(SECRET_A, "old") as old_stream:
            await start_stream(send_old, old_stream)

            # 1. The new secret beside the old one.
            monkeypatch.setenv("PARKWAY_TEST_SECRET_NEXT", SECRET_B)
            path.write_text(config_toml(secret_env=["PARKWAY_TEST_SECRET", "PARKWAY_TEST_SECRET_NEXT"]))
            assert running.parkway.reload() == []
            assert (await status(SECRET_A), await status(SECRET_B)) == (200, 200)

            # 2. Signers move over: new URLs carry the new secret.
            async with stream_signed_with(SECRET_B, "new") as new_stream:
                await start_stream(send_new, new_stream)

                # 3. The old secret goes.
                path.write_text(config_toml(secret_env=["PARKWAY_TEST_SECRET_NEXT"]))
                assert running.parkway.reload() == []
                assert (await status(SECRET_A), await status(SECRET_B)) == (403, 200)

                # Nothing in flight was dropped, whichever secret it was signed with.
                await finish_stream(send_new, new_stream)
            await finish_stream(send_old, old_stream)
        with trio.fail_after(5):
            old_line = await logs.wait_for(event="request", upstream_path="/v1/stream/old")
            new_line = await logs.wait_for(event="request", upstream_path="/v1/stream/new")

    assert old_line["outcome"] == new_line["outcome"] == "ok"
    assert not any(ex.proxy_left for ex in upstream.exchanges)
    metrics = await scrape(client, running.parkway.admin_addresses[0])
    assert metrics.by("parkway_config_reloads_total", "result") == {("ok",): 2}
    assert metrics.value("parkway_requests_total", credential="app", status_class="2xx", outcome="ok") == 6


# --- signals to a real process ----------------------------------------------------------------------


async def start_process(processes: ProcessGroup, tmp_path: Path, secret: str):
    port, admin_port = free_port(), free_port()
    path = tmp_path / "parkway.toml"
    path.write_text(config_toml(listen=f"127.0.0.1:{port}", admin=f"127.0.0.1:{admin_port}", secret=[secret]))
    running = await processes.spawn(path, port, admin_port=admin_port)
    (startup,) = await running.logs.wait_for(event="startup")
    assert startup["listen"] == [f"127.0.0.1:{port}"] and startup["pid"] == running.pid
    return running


async def status_via(running, upstream: Upstream, secret: str) -> int:
    return (await exchange(running.port, "GET", sign(running.base, f"{upstream.base}/v1/models", secret=secret))).status


async def test_sighup_reloads_the_file_of_a_running_process(processes, upstream, client, tmp_path):
    running = await start_process(processes, tmp_path, SECRET_A)
    assert (await status_via(running, upstream, SECRET_A), await status_via(running, upstream, SECRET_B)) == (200, 403)

    running.config_path.write_text(
        config_toml(listen=f"127.0.0.1:{running.port}", admin=f"127.0.0.1:{running.admin_port}", secret=[SECRET_B])
    )
    running.signal(signal.SIGHUP)
    await running.logs.wait_for(event="config_reloaded")

    assert (await status_via(running, upstream, SECRET_A), await status_via(running, upstream, SECRET_B)) == (403, 200)
    metrics = await scrape(client, f"127.0.0.1:{running.admin_port}")
    assert metrics.by("parkway_config_reloads_total", "result") == {("ok",): 1}
    assert running.process.returncode is None

    running.signal(signal.SIGTERM)
    assert await running.wait_exit() == 0


async def test_sigterm_drains_the_stream_in_flight_then_exits_0(processes, upstream, client, tmp_path):
    running = await start_process(processes, tmp_path, SECRET_A)
    streams = Streams()
    upstream.behaviour = streams
    send = streams.open("drain")
    url = sign(running.base, f"{upstream.base}/v1/stream/drain", method="POST", secret=SECRET_A)

    async with send, stream_through(client, url) as flight:
        await start_stream(send, flight)
        running.signal(signal.SIGTERM)
        await running.logs.wait_for(event="draining")
        # New connections are refused while the stream is still being relayed.
        await wait_until_refused(running.port)
        assert running.process.returncode is None
        await finish_stream(send, flight)

    assert await running.wait_exit() == 0
    (line,) = running.logs.find(event="request")
    assert (line["outcome"], line["status"]) == ("ok", 200)
    assert running.logs.find(event="shutdown")


@pytest.mark.parametrize("choice, used", [("auto", "httptools"), ("h11", "h11"), ("httptools", "httptools")])
async def test_the_request_head_parser_shows_in_the_startup_line_and_in_metrics(start_operable, client, choice, used):
    with structlog.testing.capture_logs() as logs:
        running = await start_operable(admin_config(http=choice))
    startup = [line for line in logs if line["event"] == "startup"]
    assert [line["http"] for line in startup] == [used]
    scraped = await scrape(client, running.parkway.admin_addresses[0])
    assert scraped.by("parkway_http_parser", "parser") == {
        ("h11",): float(used == "h11"),
        ("httptools",): float(used == "httptools"),
    }


async def test_serve_logs_what_check_config_warns_of(start_operable):
    """A credential that may reach any upstream is said at start-up, as ``check-config`` says it,
    and only for that credential."""
    bounded = Credential("bounded", ("other-secret",), INJECTED, allowed_upstreams=("http://127.0.0.1/",))
    config = replace(admin_config(), credentials=(*admin_config().credentials, bounded))
    with structlog.testing.capture_logs() as logs:
        await start_operable(config)
    warnings = [line for line in logs if line["event"] == "config_warning"]
    assert [(w["key"], w["log_level"]) for w in warnings] == [("credentials[0].allowed_upstreams", "warning")]
    assert "'app' may reach any upstream" in warnings[0]["problem"]
    assert SECRET not in json.dumps(warnings)
