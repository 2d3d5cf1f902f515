"""Draw docs/trace.svg: one real trace of the demo, as a collector receives it over OTLP/HTTP.

A "Rails action" span (made here with the OpenTelemetry SDK) signs a URL with its trace
context as ``pw_traceparent``; the browser (this script) sends it to Parkway, which streams a
completion from the mock OpenAI upstream and exports its spans to a small OTLP/HTTP receiver
below. The spans are decoded with opentelemetry-proto and drawn as a waterfall with matplotlib.

    pip install -e '.[otel,test,loadtest]'
    python examples/telemetry/trace_picture.py [docs/trace.svg]
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx2 as httpx
import trio
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from proxy.app import Parkway
from proxy.config import Config, Credential, ServerConfig
from proxy.demo.mock_openai import MockOpenAI, serve_mock
from proxy.signing import sign_url
from proxy.telemetry.model import TelemetryConfig

SECRET = "demo-signing-secret"
KEY = "sk-demo-upstream-key"
BODY = {
    "model": "gpt-4o-mini",
    "stream": True,
    "stream_options": {"include_usage": True},
    "messages": [{"role": "user", "content": "What does Parkway do?"}],
}
KINDS = {1: "internal", 2: "server", 3: "client"}


class Receiver:
    """Keeps every span it is sent: (service, name, kind, span id, parent id, start, end, attributes)."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                    service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            receiver.spans.append(
                                dict(
                                    service=service,
                                    name=s.name,
                                    kind=KINDS.get(s.kind, "?"),
                                    id=s.span_id.hex(),
                                    parent=s.parent_span_id.hex(),
                                    start=s.start_time_unix_nano,
                                    end=s.end_time_unix_nano,
                                    attributes={a.key: a.value for a in s.attributes},
                                )  # fmt: skip
                            )
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


async def one_trace(receiver: Receiver) -> None:
    """The signer's span around signing, then the browser's request through Parkway."""
    rails = TracerProvider(resource=Resource.create({"service.name": "rails"}))
    rails.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces")))
    tracer = rails.get_tracer("rails")
    async with trio.open_nursery() as nursery:
        mock = await nursery.start(serve_mock, MockOpenAI(api_key=KEY, delay=0.03))
        config = Config(
            server=ServerConfig(listen=("127.0.0.1:0",), allow_private_upstreams=True),
            credentials=(Credential("demo", (SECRET,), (("Authorization", f"Bearer {KEY}"),)),),
            telemetry=TelemetryConfig(otlp_endpoint=receiver.endpoint),
        )
        parkway = Parkway(config)
        async with trio.open_nursery() as serving:
            (address,) = await serving.start(parkway.run)
            await browse(tracer, address, mock)
            parkway.shutdown()  # the last spans are flushed on the way out
        nursery.cancel_scope.cancel()  # the mock upstream
    rails.shutdown()


async def browse(tracer: Any, address: str, mock: str) -> None:
    """The Rails action signs (inside its span), then the browser posts the signed URL."""
    async with httpx.AsyncClient(trust_env=False) as client:
        with tracer.start_as_current_span("POST /chats", kind=SpanKind.SERVER) as action:
            ctx = action.get_span_context()
            url = sign_url(
                id="demo", secret=SECRET, host=f"http://{address}", proxy_url=f"{mock}/v1/chat/completions",
                expiry=60, method="POST", headers={"Content-Type": "application/json"}, body=json.dumps(BODY),
                params={"pw_user": "42", "pw_traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"},
            )  # fmt: skip
            await trio.sleep(0.005)  # the action renders its page; the browser calls Parkway next
        answer = await client.post(url, content=json.dumps(BODY), headers={"Content-Type": "application/json"})
        answer.raise_for_status()


def draw(spans: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: a small, searchable SVG
    import matplotlib.pyplot as plt

    by_id = {s["id"]: s for s in spans}

    def depth(s: dict[str, Any]) -> int:
        return 0 if s["parent"] not in by_id else 1 + depth(by_id[s["parent"]])

    def order(s: dict[str, Any]) -> tuple[int, int]:
        return (s["start"], depth(s))

    spans = sorted(spans, key=order)
    t0 = min(s["start"] for s in spans)
    total = max(s["end"] for s in spans) - t0
    colours = {"rails": "#cc342d", "parkway": "#2b6cb0"}
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(spans) + 0.9))
    for row, s in enumerate(spans):
        start, width = (s["start"] - t0) / 1e6, max((s["end"] - s["start"]) / 1e6, total / 1e6 / 300)
        ax.barh(row, width, left=start, height=0.6, color=colours.get(s["service"], "#718096"))
        a = s["attributes"]
        extra = ""
        if "gen_ai.usage.output_tokens" in a:
            ttfc = a["gen_ai.response.time_to_first_chunk"].double_value * 1000
            extra = (f"  in {a['gen_ai.usage.input_tokens'].int_value} / out "
                     f"{a['gen_ai.usage.output_tokens'].int_value} tokens, first chunk {ttfc:.0f} ms")  # fmt: skip
        label = f"{'  ' * depth(s)}{s['service']}: {s['name']} ({s['kind']}){extra}"
        ax.text(start + width + total / 1e6 / 150, row, label, va="center", fontsize=8)
    ax.set_xlim(0, total / 1e6 * 1.9)
    ax.set_ylim(len(spans) - 0.5, -0.5)
    ax.set_yticks([])
    ax.set_xlabel("milliseconds since the Rails action started")
    ax.set_title("One trace: the Rails action that signed the URL, Parkway, the upstream call", fontsize=10)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "docs/trace.svg"
    receiver = Receiver()
    trio.run(one_trace, receiver)
    receiver.server.shutdown()
    draw(receiver.spans, path)
    print(f"{path}: {len(receiver.spans)} spans")


if __name__ == "__main__":
    main()
