"""OpenTelemetry traces end to end: Parkway exports to a real OTLP/HTTP receiver on loopback
(decoded with opentelemetry-proto), with the mock OpenAI upstream behind it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from proxy.app import Parkway
from proxy.config import Config, Credential
from proxy.demo.mock_openai import MockOpenAI, serve_mock
from proxy.jobs import webhooks
from proxy.jobs.model import JobsConfig
from proxy.telemetry.model import TelemetryConfig
from support.http import exchange, request_bytes, send_raw
from support.metrics import scrape
from support.otlp import Receiver, otlp_receiver
from support.parkway import TEST_SERVER, Parkways, RunningParkway, with_jobs
from support.processes import free_port
from support.signing import INJECTED, SECRET, UPSTREAM_KEY, sign
from support.upstream import Upstream, respond_with, sse_then
from support.websocket import RealtimeUpstream, ws_client
from support.websocket import event as ws_event

HANG_LIMIT = 40.0
PROMPT = "the-secret-prompt-text"
MODEL = "mock-gpt-4o"
TEXT = "alpha beta gamma delta"  # MockOpenAI: 9 prompt tokens, one completion token per word
SIGNER_TRACE = "0af7651916cd43dd8448eb211c80319c"
SIGNER_SPAN = "b7ad6b7169203331"
BROWSER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
BROWSER_SPAN = "00f067aa0ba902b7"


def chat_body(stream: bool = True) -> str:
    request = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": stream}
    if stream:
        request["stream_options"] = {"include_usage": True}
    return json.dumps(request)


def telemetry_config(endpoint: str, *, propagate: bool = False, **telemetry: object) -> Config:
    credential = Credential("app", (SECRET,), INJECTED, propagate_trace=propagate)
    return Config(
        server=TEST_SERVER,
        credentials=(credential,),
        telemetry=TelemetryConfig(otlp_endpoint=endpoint, **telemetry),  # type: ignore[arg-type]
    )


@pytest.fixture
async def mock(nursery: trio.Nursery, hang_guard: None) -> AsyncIterator[tuple[str, MockOpenAI]]:
    app = MockOpenAI(api_key=UPSTREAM_KEY, delay=0.01, text=TEXT)
    base = await nursery.start(serve_mock, app)
    yield base, app


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """Set up before ``parkways``, so it is still there for their last flush."""
    with otlp_receiver() as started:
        yield started


@pytest.fixture
async def parkways(receiver: Receiver, nursery: trio.Nursery) -> AsyncIterator[Parkways]:
    started = Parkways(nursery)
    yield started
    await started.drain()


def signed_chat(running: RunningParkway, mock_base: str, **params: str) -> str:
    return sign(
        running.base, f"{mock_base}/v1/chat/completions", signer="proxy.signing", method="POST",
        headers={"Content-Type": "application/json"}, body=chat_body(), params=params or None,
    )  # fmt: skip


async def flush(parkway: Parkway) -> None:
    """Export what has ended now (on a thread: it is the exporter's blocking call)."""
    assert parkway.tracing is not None
    await trio.to_thread.run_sync(parkway.tracing.processor.force_flush)


async def wait_for_spans(receiver: Receiver, predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    assert await trio.to_thread.run_sync(receiver.wait_for, predicate, timeout), receiver.spans


async def test_streamed_completion_is_one_trace_under_the_signers_parent(mock, receiver, parkways) -> None:
    mock_base, app = mock
    running = await parkways.start(telemetry_config(receiver.endpoint))
    url = signed_chat(running, mock_base, pw_traceparent=f"00-{SIGNER_TRACE}-{SIGNER_SPAN}-01", pw_user="u-4242")
    browser = ("traceparent", f"00-{BROWSER_TRACE}-{BROWSER_SPAN}-01")
    reply = await exchange(
        running.port, "POST", url, chat_body().encode(), [("content-type", "application/json"), browser]
    )
    assert reply.status == 200, reply.body
    assert reply.body.endswith(b"data: [DONE]\n\n")
    await flush(running.parkway)
    await wait_for_spans(receiver, lambda r: any(s.kind == "server" for s in r.spans))

    (server,) = [s for s in receiver.spans if s.kind == "server"]
    (client,) = [s for s in receiver.spans if s.kind == "client"]
    # The signer's trace context (signed, so trusted) is the parent; the browser's is a link only.
    assert (server.trace_id, server.parent_id) == (SIGNER_TRACE, SIGNER_SPAN)
    assert [(t, s) for t, s, _ in server.links] == [(BROWSER_TRACE, BROWSER_SPAN)]
    assert all(s.trace_id == SIGNER_TRACE for s in receiver.spans)
    assert server.name == "POST /"
    assert server.service == "parkway"
    a = server.attributes
    assert a["http.request.method"] == "POST" and a["http.route"] == "/"
    assert a["http.response.status_code"] == 200 and a["client.address"] == "127.0.0.1"
    assert a["parkway.credential"] == "app" and a["parkway.outcome"] == "ok"
    assert "X-Sw-Signature=REDACTED" in a["url.query"] and "pw_user" not in a["url.query"]
    assert "enduser.id" not in a

    # One CLIENT span per upstream call, named by the GenAI conventions, open to the last byte.
    assert client.name == f"chat {MODEL}" and client.parent_id == server.span_id
    c = client.attributes
    assert c["gen_ai.operation.name"] == "chat"
    assert c["gen_ai.request.model"] == c["gen_ai.response.model"] == MODEL
    assert c["gen_ai.response.id"] == "chatcmpl-mock"
    assert c["gen_ai.response.finish_reasons"] == ("stop",)
    assert (c["gen_ai.usage.input_tokens"], c["gen_ai.usage.output_tokens"]) == (9, 4)
    assert 0 < c["gen_ai.response.time_to_first_chunk"] < (client.end_ns - client.start_ns) / 1e9
    assert c["server.address"] == "127.0.0.1" and c["http.response.status_code"] == 200
    assert not client.error
    # The words come 10 ms apart: the span lasted until the last of them.
    assert client.end_ns - client.start_ns >= 4 * 0.01 * 1e9
    assert server.start_ns <= client.start_ns and client.end_ns <= server.end_ns

    steps = {s.name: s for s in receiver.spans if s.kind == "internal"}
    assert {"parkway.authorize", "parkway.limits"} <= set(steps)
    assert all(s.parent_id == server.span_id for s in steps.values())

    # No signature, injected key, prompt, or (without record_user) user anywhere on the wire.
    signature = url.split("X-Sw-Signature=")[1].split("&")[0]
    wire = b"".join(receiver.bodies)
    for secret in (signature, UPSTREAM_KEY, PROMPT, "u-4242", SECRET):
        assert secret.encode() not in wire, secret
    # Not sent upstream: this credential does not propagate trace context.
    (head, _body) = app.requests[-1]
    assert head.header(b"traceparent") == browser[1]  # the browser's own header passes as before


async def test_trace_context_goes_upstream_only_when_the_credential_allows(mock, receiver, parkways) -> None:
    mock_base, app = mock
    running = await parkways.start(telemetry_config(receiver.endpoint, propagate=True, record_user=True))
    url = signed_chat(running, mock_base, pw_user="u-4242")
    browser = ("traceparent", f"00-{BROWSER_TRACE}-{BROWSER_SPAN}-01")
    json_type = ("content-type", "application/json")
    reply = await exchange(running.port, "POST", url, chat_body().encode(), [json_type, browser])
    assert reply.status == 200
    await flush(running.parkway)
    await wait_for_spans(receiver, lambda r: any(s.kind == "server" for s in r.spans))
    (client,) = [s for s in receiver.spans if s.kind == "client"]
    (server,) = [s for s in receiver.spans if s.kind == "server"]
    (head, _body) = app.requests[-1]
    # Parkway's CLIENT span replaced the browser's header; no signer parent: a trace of its own.
    assert head.headers.count((b"traceparent", f"00-{client.trace_id}-{client.span_id}-01".encode())) == 1
    assert [v for n, v in head.headers if n == b"traceparent"] == [f"00-{client.trace_id}-{client.span_id}-01".encode()]
    assert server.parent_id == "" and client.trace_id != BROWSER_TRACE
    assert server.attributes["enduser.id"] == "u-4242"


async def test_a_forged_request_is_a_root_span_with_the_error_code(mock, receiver, parkways) -> None:
    mock_base, app = mock
    running = await parkways.start(telemetry_config(receiver.endpoint))
    # The browser swapped the signed pw_traceparent for its own: the signature no longer verifies,
    # and the context it named must not become the parent.
    url = signed_chat(running, mock_base, pw_traceparent=f"00-{SIGNER_TRACE}-{SIGNER_SPAN}-01")
    forged = url.replace(SIGNER_SPAN, BROWSER_SPAN)
    reply = await exchange(running.port, "POST", forged, chat_body().encode(), [("content-type", "application/json")])
    assert reply.status == 403 and reply.code == "signature_mismatch"
    await flush(running.parkway)
    await wait_for_spans(receiver, lambda r: any(s.kind == "server" for s in r.spans))
    (server,) = receiver.spans
    assert server.parent_id == "" and server.trace_id != SIGNER_TRACE and not server.links
    assert server.attributes["error.type"] == "signature_mismatch"
    assert server.attributes["http.response.status_code"] == 403
    assert server.attributes["parkway.outcome"] == "refused:signature_mismatch"
    assert not app.requests


async def test_an_upstream_that_cuts_the_stream_makes_the_client_span_an_error(receiver, parkways, upstream) -> None:
    upstream.behaviour = sse_then([b'data: {"id":"x","model":"m","choices":[]}\n\n'], "close")
    running = await parkways.start(telemetry_config(receiver.endpoint))
    body = json.dumps({"model": "m", "stream": True})
    url = sign(running.base, f"{upstream.base}/v1/chat/completions", signer="proxy.signing", method="POST",
               body=body)  # fmt: skip
    _sent, raw = await send_raw(
        running.port, request_bytes("POST", url, body.encode(), headers=[("connection", "close")])
    )
    assert raw.startswith(b"HTTP/1.1 200") and not raw.endswith(b"0\r\n\r\n")  # cut, as the upstream cut it
    await flush(running.parkway)
    await wait_for_spans(receiver, lambda r: any(s.kind == "server" for s in r.spans))
    (client,) = [s for s in receiver.spans if s.kind == "client"]
    assert client.name == "chat m" and client.error
    assert client.attributes["gen_ai.response.model"] == "m"


@pytest.mark.parametrize("collector", ["down", "hanging"])
async def test_a_collector_down_or_hanging_changes_no_answer(mock, parkways, client, collector) -> None:
    mock_base, _app = mock
    receiver = Receiver(hang=True)
    receiver.start()
    endpoint = receiver.endpoint if collector == "hanging" else f"http://127.0.0.1:{free_port()}"
    try:
        config = telemetry_config(endpoint)
        parkway = Parkway(replace(config, admin=replace(config.admin, listen=("127.0.0.1:0",))))
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        from proxy.telemetry.tracing import Tracing

        # A small queue and a short export timeout, so the test sees spans dropped within seconds.
        parkway.tracing = Tracing(  # the gateway, built when it runs, takes this one
            config.telemetry, dropped=parkway.metrics.spans_dropped, failures=parkway.metrics.span_exports_failed,
            exporter=OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces", timeout=1), queue_size=8,
        )  # fmt: skip
        running = await parkways.start(parkway)
        url = signed_chat(running, mock_base)
        durations = []
        for _ in range(12):
            started = trio.current_time()
            reply = await exchange(
                running.port, "POST", url, chat_body().encode(), [("content-type", "application/json")]
            )
            durations.append(trio.current_time() - started)
            assert reply.status == 200 and reply.body.endswith(b"data: [DONE]\n\n")
        # The export thread waits for the collector (up to its 1 s timeout per export); requests do
        # not (4 words 10 ms apart take ~50 ms). The median, not the slowest: one request stalled by
        # a loaded machine is not a request waiting on the export, which would slow most of them.
        assert sorted(durations)[len(durations) // 2] < 0.5, durations
        if collector == "hanging":
            assert await trio.to_thread.run_sync(receiver.wait_for, lambda r: r.requests >= 1, 15)
        metrics = await scrape(client, running.parkway.admin_addresses[0])
        assert metrics.value("parkway_trace_spans_dropped_total") > 0  # 12 requests x 4 spans > 8 queued
        started = trio.current_time()
        running.parkway.shutdown()
        await running.stopped.wait()
        assert trio.current_time() - started < 8  # the last flush is bounded, even against a hung collector
    finally:
        receiver.close()


def test_telemetry_off_loads_no_opentelemetry_module() -> None:
    # A fresh interpreter: this test process has imported OpenTelemetry already.
    code = (
        "import sys, trio\n"
        "from proxy.app import Parkway\nfrom proxy.cli import main\nfrom proxy.config import parse_config\n"
        "config = parse_config('[server]\\nlisten = [\"127.0.0.1:0\"]\\n', {})\n"
        "parkway = Parkway(config)\n"
        "assert parkway.tracing is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    cwd = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_endpoint_without_the_otel_extra_is_refused_at_load() -> None:
    code = (
        "import sys\nsys.modules['opentelemetry'] = None  # as if parkway[otel] were not installed\n"
        "from proxy.config import parse_config\nfrom proxy.errors import ConfigError\n"
        "try:\n    parse_config('[telemetry]\\notlp_endpoint = \"http://127.0.0.1:4318\"\\n', {})\n"
        "except ConfigError as exc:\n    print(exc)\n"
    )
    cwd = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "telemetry.otlp_endpoint" in result.stdout and "parkway[otel]" in result.stdout


async def test_genai_metrics_without_traces(mock, parkways, client) -> None:
    """The GenAI metrics are on /metrics whether or not traces are; never labelled by user."""
    mock_base, _app = mock
    config = telemetry_config("")
    running = await parkways.start(replace(config, admin=replace(config.admin, listen=("127.0.0.1:0",))))
    assert running.parkway.tracing is None
    started = trio.current_time()
    reply = await exchange(
        running.port, "POST", signed_chat(running, mock_base, pw_user="u-4242"), chat_body().encode(),
        [("content-type", "application/json")],
    )  # fmt: skip
    elapsed = trio.current_time() - started
    assert reply.status == 200
    # Not a GenAI call: not in these metrics. A GenAI call that failed: counted, by its outcome.
    models = sign(running.base, f"{mock_base}/v1/models", signer="proxy.signing")
    assert (await exchange(running.port, "GET", models)).status == 200
    gone = sign(running.base, f"http://127.0.0.1:{free_port()}/v1/chat/completions", signer="proxy.signing")
    assert (await exchange(running.port, "GET", gone)).status == 502
    metrics = await scrape(client, running.parkway.admin_addresses[0])
    assert metrics.by("gen_ai_server_request_duration_seconds_count", "model", "outcome") == {
        (MODEL, "ok"): 1,
        ("unknown", "upstream_error"): 1,
    }
    labels = {"credential": "app", "model": MODEL, "outcome": "ok"}
    assert metrics.value("gen_ai_server_request_duration_seconds_count", **labels) == 1
    ttft = metrics.value("gen_ai_server_time_to_first_token_seconds_sum", **labels)
    duration = metrics.value("gen_ai_server_request_duration_seconds_sum", **labels)
    # The words come 10 ms apart: the first chunk is well before the last.
    assert 0 < ttft < duration <= elapsed
    assert duration - ttft >= 4 * 0.01 * 0.9
    assert metrics.value("gen_ai_server_time_per_output_token_seconds_count", **labels) == 1
    assert metrics.value("gen_ai_client_token_usage_sum", **labels, token_type="input") == 9
    assert metrics.value("gen_ai_client_token_usage_sum", **labels, token_type="output") == 4
    assert "u-4242" not in metrics.label_values("model") | metrics.label_values("credential")
    assert "user" not in {k for (_, labels_), _ in metrics.samples.items() for k, _ in labels_}


async def test_a_job_has_its_own_trace_linked_to_the_request_that_created_it(
    mock, receiver, parkways, nursery, tmp_path
) -> None:
    mock_base, app = mock
    hooks = await nursery.start(Upstream(respond_with(204, b"")).serve)
    credential = Credential(
        "app", (SECRET,), INJECTED, allowed_callbacks=(f"{hooks.base}/hooks/",),
        webhook_secrets=(webhooks.format_secret(bytes(range(32))),), propagate_trace=True,
    )  # fmt: skip
    config = with_jobs(
        replace(telemetry_config(receiver.endpoint), credentials=(credential,)),
        JobsConfig(enabled=True, path=str(tmp_path / "jobs.sqlite3"), poll_interval=0.05),
    )
    running = await parkways.start(config)
    body = chat_body(stream=False)
    url = sign(
        running.base, f"{mock_base}/v1/chat/completions", signer="proxy.signing", method="POST", body=body,
        params={"pw_callback": f"{hooks.base}/hooks/done", "pw_traceparent": f"00-{SIGNER_TRACE}-{SIGNER_SPAN}-01"},
    )  # fmt: skip
    reply = await exchange(running.port, "POST", url, body.encode(), [("content-type", "application/json")])
    assert reply.status == 202, reply.body
    await hooks.wait_for_requests(1)
    await flush(running.parkway)
    await wait_for_spans(receiver, lambda r: bool(r.named("POST webhook")) and bool(r.named("parkway.job")))

    (server,) = [s for s in receiver.spans if s.kind == "server"]
    (job,) = receiver.named("parkway.job")
    (call,) = [s for s in receiver.spans if s.kind == "client" and s.parent_id == job.span_id]
    (delivery,) = receiver.named("POST webhook")
    assert server.trace_id == SIGNER_TRACE and server.attributes["http.response.status_code"] == 202
    # The job runs later, in a trace of its own that links back to the request.
    assert job.trace_id != SIGNER_TRACE and job.parent_id == ""
    assert [(t, s) for t, s, _ in job.links] == [(SIGNER_TRACE, server.span_id)]
    assert call.name == f"chat {MODEL}" and call.trace_id == job.trace_id
    # This credential propagates: the job's upstream call carries its CLIENT span's context.
    (head, _body) = app.requests[-1]
    assert head.header(b"traceparent") == f"00-{call.trace_id}-{call.span_id}-01"
    assert (call.attributes["gen_ai.usage.input_tokens"], call.attributes["gen_ai.usage.output_tokens"]) == (9, 4)
    assert call.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert delivery.kind == "client" and [(t, s) for t, s, _ in delivery.links] == [(SIGNER_TRACE, server.span_id)]
    assert delivery.attributes["http.response.status_code"] == 204 and not delivery.error
    assert PROMPT.encode() not in b"".join(receiver.bodies)


async def test_a_websocket_session_is_a_trace_with_its_upstream_side(receiver, parkways, nursery) -> None:
    realtime = await nursery.start(RealtimeUpstream().serve)
    running = await parkways.start(telemetry_config(receiver.endpoint))
    url = urlsplit(sign(running.base, realtime.url, params={"pw_traceparent": f"00-{SIGNER_TRACE}-{SIGNER_SPAN}-01"},
                        signer="proxy.signing"))  # fmt: skip
    with trio.fail_after(10):
        async with ws_client(running.port, f"{url.path}?{url.query}", subprotocols=["realtime"]) as ws:
            assert json.loads(await ws.get_message())["type"] == "session.created"
            await ws.send_message(ws_event("response.create"))
            for _ in range(4):
                last = json.loads(await ws.get_message())
            assert last["type"] == "response.done"
    await flush(running.parkway)
    # The session's spans end when Parkway has closed both sides; the processor's next export brings them.
    await wait_for_spans(receiver, lambda r: any(s.kind == "server" for s in r.spans))
    (server,) = [s for s in receiver.spans if s.kind == "server"]
    (session,) = [s for s in receiver.spans if s.kind == "client"]
    assert (server.trace_id, server.parent_id) == (SIGNER_TRACE, SIGNER_SPAN)
    assert server.attributes["http.response.status_code"] == 101
    assert session.name == "websocket session" and session.parent_id == server.span_id
    a = session.attributes
    assert a["parkway.websocket.closed_by"] == "client" and a["parkway.websocket.messages_from_client"] == 1
    assert a["parkway.websocket.close_code_upstream"] == 1000 and not session.error


async def test_a_policy_refusal_after_the_signature_keeps_the_signers_parent(mock, receiver, parkways) -> None:
    mock_base, app = mock
    config = telemetry_config(receiver.endpoint)
    only_elsewhere = replace(config.credentials[0], allowed_upstreams=("https://api.openai.com/v1/",))
    running = await parkways.start(replace(config, credentials=(only_elsewhere,)))
    url = signed_chat(running, mock_base, pw_traceparent=f"00-{SIGNER_TRACE}-{SIGNER_SPAN}-01")
    reply = await exchange(running.port, "POST", url, chat_body().encode(), [("content-type", "application/json")])
    assert reply.status == 403 and reply.code == "upstream_not_allowed"
    await flush(running.parkway)
    await wait_for_spans(receiver, lambda r: any(s.kind == "server" for s in r.spans))
    (server,) = [s for s in receiver.spans if s.kind == "server"]
    (authorize,) = receiver.named("parkway.authorize")
    # The signature verified, so the signer's trace holds the refusal; the step that refused says why.
    assert (server.trace_id, server.parent_id) == (SIGNER_TRACE, SIGNER_SPAN)
    assert server.attributes["error.type"] == "upstream_not_allowed" and not server.error  # a 4xx
    assert authorize.parent_id == server.span_id and authorize.error
    assert authorize.attributes["error.type"] == "upstream_not_allowed"
    assert authorize.start_ns == server.start_ns
    assert not app.requests


async def test_a_cache_hit_is_a_lookup_without_an_upstream_call(mock, receiver, parkways) -> None:
    mock_base, app = mock
    running = await parkways.start(telemetry_config(receiver.endpoint))
    url = sign(
        running.base, f"{mock_base}/v1/chat/completions", signer="proxy.signing", method="POST",
        headers={"Content-Type": "application/json"}, body=chat_body(stream=False), params={"pw_cache": "60"},
    )  # fmt: skip
    for _ in range(2):
        reply = await exchange(
            running.port, "POST", url, chat_body(stream=False).encode(), [("content-type", "application/json")]
        )
        assert reply.status == 200
    await flush(running.parkway)
    await wait_for_spans(receiver, lambda r: len([s for s in r.spans if s.kind == "server"]) == 2)
    stored, hit = sorted((s for s in receiver.spans if s.kind == "server"), key=lambda s: s.start_ns)
    assert (stored.attributes["parkway.cache"], hit.attributes["parkway.cache"]) == ("stored", "hit")
    calls = [s for s in receiver.spans if s.kind == "client"]
    assert len(calls) == 1 and calls[0].trace_id == stored.trace_id and len(app.requests) == 1
    lookups = {s.trace_id: s for s in receiver.named("parkway.cache.lookup")}
    assert lookups.keys() == {stored.trace_id, hit.trace_id}
    assert lookups[hit.trace_id].parent_id == hit.span_id


async def test_an_unsigned_streamed_body_names_the_span_by_its_model(mock, receiver, parkways) -> None:
    """The usual browser request: the prompt is not signed, so the body streams to the upstream."""
    mock_base, app = mock
    running = await parkways.start(telemetry_config(receiver.endpoint))
    url = sign(running.base, f"{mock_base}/v1/chat/completions", signer="proxy.signing", method="POST")
    body = chat_body().encode()
    request = request_bytes("POST", url, chunks=[body[:7], body[7:]], headers=[("connection", "close")])
    _sent, raw = await send_raw(running.port, request)
    assert raw.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in raw
    await flush(running.parkway)
    await wait_for_spans(receiver, lambda r: any(s.kind == "client" for s in r.spans))
    (client,) = [s for s in receiver.spans if s.kind == "client"]
    assert client.name == f"chat {MODEL}" and client.attributes["gen_ai.request.model"] == MODEL
    assert app.requests[-1][1] == body  # passed on unchanged
