"""A real OTLP/HTTP trace receiver for the tests: a thread HTTP server on 127.0.0.1 that decodes
each ``ExportTraceServiceRequest`` with ``opentelemetry-proto``, as a collector would.

``hang`` makes it read requests and never answer (a collector that is stuck). Spans are kept
decoded as :class:`Span`; :meth:`Receiver.wait_for` waits on a condition, not a sleep.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

KINDS = {
    SpanProto.SPAN_KIND_INTERNAL: "internal",
    SpanProto.SPAN_KIND_SERVER: "server",
    SpanProto.SPAN_KIND_CLIENT: "client",
    SpanProto.SPAN_KIND_PRODUCER: "producer",
    SpanProto.SPAN_KIND_CONSUMER: "consumer",
}


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    return getattr(v, which) if which else None


@dataclass
class Span:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: list[tuple[str, str, dict[str, Any]]]
    status_code: int  # 0 unset, 1 ok, 2 error
    service: str
    raw: bytes = field(repr=False, default=b"")  # the span as it went over the wire

    @property
    def error(self) -> bool:
        return self.status_code == 2


class Receiver:
    def __init__(self, *, hang: bool = False):
        self.hang = hang
        self.spans: list[Span] = []
        self.requests = 0
        self.bodies: list[bytes] = []
        self.paths: list[str] = []
        self._changed = threading.Condition()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._changed:
                    receiver.requests += 1
                    receiver._changed.notify_all()
                if receiver.hang:
                    receiver._release.wait(30)
                    return
                receiver._take(self.path, body)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _take(self, path: str, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        decoded = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    decoded.append(
                        Span(
                            name=s.name,
                            kind=KINDS.get(s.kind, str(s.kind)),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            links=[
                                (ln.trace_id.hex(), ln.span_id.hex(), {a.key: _value(a.value) for a in ln.attributes})
                                for ln in s.links
                            ],
                            status_code=s.status.code,
                            service=resource.get("service.name", ""),
                            raw=s.SerializeToString(),
                        )
                    )
        with self._changed:
            self.paths.append(path)
            self.bodies.append(body)
            self.spans += decoded
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[Receiver], bool], timeout: float = 20.0) -> bool:
        """Block (call it from a thread) until ``predicate(self)`` holds or ``timeout`` passes."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def otlp_receiver(*, hang: bool = False) -> Iterator[Receiver]:
    receiver = Receiver(hang=hang)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.close()
