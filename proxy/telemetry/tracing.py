"""Spans, exported over OTLP/HTTP: the only module that imports OpenTelemetry.

Loaded only when ``[telemetry] otlp_endpoint`` is set (:func:`open_tracing`). One trace per
request: a SERVER span, INTERNAL spans for the steps that can take time, and a CLIENT span per
upstream call that stays open until the last byte of the answer. Parents are passed explicitly
(from the request's :class:`RequestTrace`), never through OpenTelemetry's global context, so Trio
tasks and the relay engine need no context juggling.

Trust: the parent of a request's trace is the signer's ``pw_traceparent`` (covered by the
signature, read only once it verified); a browser's ``traceparent`` header is a span link, never a
parent. No span carries the signature, the credential's injected headers or any body text.

Export happens on the SDK's batch processor thread, off the Trio thread. The queue is bounded:
when the collector is down or slow, spans are dropped (``parkway_trace_spans_dropped_total``),
never waited for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from prometheus_client import Counter

from .. import __version__
from ..query import parse_query
from ..relay.usage import Usage, UsageObserver
from .model import (
    MODEL_SNIFF_BYTES,
    TRACEPARENT_PARAM,
    TelemetryConfig,
    TraceParent,
    format_traceparent,
    model_in_prefix,
    operation_name,
    parse_traceparent,
    provider_name,
    redacted_query,
    request_model,
)

log = structlog.get_logger("parkway.telemetry")

QUEUE_SIZE = 2048  # spans waiting for export; past it they are dropped and counted
BATCH_SIZE = 512
SCHEDULE_DELAY_MS = 1000
SHUTDOWN_FLUSH_TIMEOUT = 5.0  # seconds the drain gives the last export
JOB_LINKS = 10_000  # jobs whose creating request is remembered for the job's own trace
FAILURE_LOG_INTERVAL = 60.0
HIDDEN_PARAMS = frozenset({"x-sw-signature", "x-sw-credential"})


def _context(parent: TraceParent | SpanContext | Span | None) -> Any:
    """An OpenTelemetry context whose current span is ``parent`` (None: a new root)."""
    if parent is None:
        return None
    if isinstance(parent, TraceParent):
        flags = TraceFlags(TraceFlags.SAMPLED if parent.sampled else TraceFlags.DEFAULT)
        parent = NonRecordingSpan(SpanContext(parent.trace_id, parent.span_id, is_remote=True, trace_flags=flags))
    elif isinstance(parent, SpanContext):
        parent = NonRecordingSpan(parent)
    return trace.set_span_in_context(parent)


class _Handoff(SpanExporter):
    """The exporter as the batch processor's thread sees it: counts the spans it takes (so the
    request path knows how full the queue is) and the batches the collector refused."""

    def __init__(self, exporter: SpanExporter, failures: Counter):
        self.exporter = exporter
        self.taken = 0
        self.failures = failures
        self._last_log = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.taken += len(spans)
        try:
            result = self.exporter.export(spans)
        except Exception:  # an exporter bug must not end the export thread
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.failures.inc()
            now = time.monotonic()
            if now - self._last_log > FAILURE_LOG_INTERVAL:  # one line a minute, not one per batch
                self._last_log = now
                log.warning("trace_export_failed", spans=len(spans))
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class BoundedBatchProcessor(BatchSpanProcessor):
    """The SDK's batch processor, which drops a span once ``queue_size`` wait, with the drop counted
    here (the request path reads two integers; it never blocks on the export thread)."""

    def __init__(self, exporter: SpanExporter, *, queue_size: int, dropped: Counter, failures: Counter):
        self.handoff = _Handoff(exporter, failures)
        self.queue_size = queue_size
        self.queued = 0
        self.dropped = dropped
        super().__init__(
            self.handoff, max_queue_size=queue_size, max_export_batch_size=min(BATCH_SIZE, queue_size),
            schedule_delay_millis=SCHEDULE_DELAY_MS,
        )  # fmt: skip

    def on_end(self, span: ReadableSpan) -> None:
        if self.queued - self.handoff.taken >= self.queue_size:
            self.dropped.inc()
            return
        self.queued += 1
        super().on_end(span)


class Tracing:
    """The process's tracer and exporter; :meth:`request` starts one request's trace."""

    def __init__(
        self,
        config: TelemetryConfig,
        *,
        dropped: Counter,
        failures: Counter,
        exporter: SpanExporter | None = None,
        queue_size: int = QUEUE_SIZE,
    ):
        self.config = config
        # The SDK's own warnings would be plain-text lines among the JSON logs: they become
        # the counters above and one structured line a minute instead.
        otel_log = logging.getLogger("opentelemetry")
        otel_log.addHandler(logging.NullHandler())
        otel_log.propagate = False
        resource = Resource.create({"service.name": config.service_name, "service.version": __version__})
        self.provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)), shutdown_on_exit=False
        )
        self.processor = BoundedBatchProcessor(
            exporter or OTLPSpanExporter(endpoint=config.traces_url),
            queue_size=queue_size, dropped=dropped, failures=failures,
        )  # fmt: skip
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("parkway", __version__)
        self._job_links: OrderedDict[str, SpanContext] = OrderedDict()
        self._lock = threading.Lock()

    def request(self, method: str, path: str, query: str, peer: str, browser_traceparent: str | None,
                *, user_param: str) -> RequestTrace:  # fmt: skip
        """A request has arrived: its trace, whose SERVER span starts once the parent is known."""
        return RequestTrace(self, method, path, query, peer, browser_traceparent, user_param)

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout); blocking: call it from a thread."""
        self.provider.shutdown()

    # --- background jobs -----------------------------------------------------------------------

    def remember_job(self, job_id: str, creator: SpanContext) -> None:
        """The request that created ``job_id``, linked from the job's own trace when it runs in this process."""
        with self._lock:
            self._job_links[job_id] = creator
            while len(self._job_links) > JOB_LINKS:
                self._job_links.popitem(last=False)

    def _job_link(self, job_id: str, note: str) -> list[Link]:
        with self._lock:
            creator = self._job_links.get(job_id)
        return [Link(creator, {"parkway.link": note})] if creator is not None else []

    @contextmanager
    def job_run(self, job_id: str, credential: str, method: str, url: str, request_body: bytes) -> Iterator[Span]:
        """A job's run: a root span linked to the request that created the job, with the upstream
        call as its CLIENT child (yielded; the caller records the answer with :func:`end_call`)."""
        root = self.tracer.start_span(
            "parkway.job", kind=SpanKind.INTERNAL, links=self._job_link(job_id, "created by"),
            attributes={"parkway.job.id": job_id[:12], "parkway.credential": credential},
        )  # fmt: skip
        call = _start_call(self.tracer, root, method, url, request_body)
        try:
            yield call
        except BaseException as exc:
            _fail(call, type(exc).__name__)
            raise
        finally:
            call.end()
            root.end()

    @contextmanager
    def webhook_delivery(self, job_id: str, url: str) -> Iterator[Span]:
        """One webhook POST: a CLIENT span of its own trace, linked to the job's creating request."""
        host = url.split("/", 3)[2] if url.count("/") >= 2 else url
        span = self.tracer.start_span(
            "POST webhook", kind=SpanKind.CLIENT, links=self._job_link(job_id, "delivers the job of"),
            attributes={"http.request.method": "POST", "server.address": host.rsplit("@", 1)[-1],
                        "parkway.job.id": job_id[:12]},
        )  # fmt: skip
        try:
            yield span
        except BaseException as exc:
            _fail(span, type(exc).__name__)
            raise
        finally:
            span.end()

    @staticmethod
    def traceparent(span: Span | None) -> str | None:
        """The W3C header naming ``span`` as the parent (for a credential with propagate_trace)."""
        ctx = span.get_span_context() if span is not None else None
        if ctx is None or not ctx.is_valid:
            return None
        return format_traceparent(ctx.trace_id, ctx.span_id, ctx.trace_flags.sampled)

    @staticmethod
    def job_answer(call: Span, status: int, content_type: str, body: bytes) -> None:
        """A job's upstream answer (read whole) on its CLIENT span."""
        usage = UsageObserver(content_type, details=True)
        usage.feed(body)
        usage.finish(True)
        record_answer(call, status, usage, None)

    @staticmethod
    def delivery_outcome(span: Span, status: int | None, error: str | None) -> None:
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error is not None or status is None or status >= 300:
            _fail(span, str(status) if status is not None else "no_answer", error)


def _fail(span: Span, error_type: str, message: str | None = None) -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, message))


def _start_call(tracer: trace.Tracer, parent: Span | SpanContext, method: str, url: str,
                body: bytes | None) -> Span:  # fmt: skip
    """The CLIENT span of an upstream call, named by the GenAI conventions when it is one."""
    scheme, _, rest = url.partition("://")
    authority, _, path = rest.partition("/")
    host = authority.rsplit("@", 1)[-1]
    hostname, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
    path = "/" + path.partition("?")[0].partition("#")[0]
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "server.address": hostname or host,
        "server.port": int(port) if port.isdigit() else (443 if scheme == "https" else 80),
        "url.path": path,
    }
    operation = operation_name(path)
    name = method
    if operation is not None:
        model = request_model(body)
        attributes["gen_ai.operation.name"] = operation
        attributes["gen_ai.provider.name"] = provider_name(hostname or host)
        if model is not None:
            attributes["gen_ai.request.model"] = model
        name = f"{operation} {model}" if model else operation
    return tracer.start_span(name, context=_context(parent), kind=SpanKind.CLIENT, attributes=attributes)


def record_answer(
    span: Span, status: int | None, usage: UsageObserver | None, first_chunk: float | None, tokens: Usage | None = None
) -> None:
    """What the upstream's answer said of itself, on its CLIENT span (set at once: the SDK locks per call)."""
    found: dict[str, Any] = {
        "http.response.status_code": status,
        "gen_ai.response.time_to_first_chunk": first_chunk,
    }
    if usage is not None:
        found["gen_ai.response.model"] = usage.model
        found["gen_ai.response.id"] = usage.response_id
        found["gen_ai.response.finish_reasons"] = usage.finish_reasons or None
    counted = tokens or (usage.usage if usage is not None else None)
    if counted is not None:
        found["gen_ai.usage.input_tokens"] = counted.prompt_tokens
        found["gen_ai.usage.output_tokens"] = counted.completion_tokens
    span.set_attributes({k: v for k, v in found.items() if v is not None})
    if status is not None and status >= 400:
        _fail(span, str(status))


class UpstreamCall:
    """One upstream call's CLIENT span, open from the request going out to the answer's last byte."""

    __slots__ = ("span", "started", "first_chunk", "status", "traceparent", "operation")

    def __init__(self, span: Span, started: float, propagate: bool, operation: str | None = None):
        self.span = span
        self.operation = operation  # a GenAI call whose request model is not known yet (a streamed body)
        self.started = started  # trio clock, for the time to the first chunk
        self.first_chunk: float | None = None
        self.status: int | None = None
        ctx = span.get_span_context()
        # Only for a credential that allows it: third-party APIs see this header.
        self.traceparent = (
            format_traceparent(ctx.trace_id, ctx.span_id, ctx.trace_flags.sampled)
            if propagate and ctx.is_valid
            else None
        )

    async def watch_body(self, chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        """A streamed request body, passed on unchanged, its first bytes read for the model the
        span is named by (a signed or buffered body was read whole when the span started)."""
        seen = b""
        async for chunk in chunks:
            if self.operation is not None:
                seen += chunk
                model = model_in_prefix(seen)
                if model is not None or len(seen) >= MODEL_SNIFF_BYTES:
                    if model is not None:
                        self.span.update_name(f"{self.operation} {model}")
                        self.span.set_attribute("gen_ai.request.model", model)
                    self.operation, seen = None, b""
            yield chunk

    def end(
        self, usage: UsageObserver | None, complete: bool, error: BaseException | None = None, *,
        tokens: Usage | None = None,
    ) -> None:  # fmt: skip
        """The call is over: what the answer said (``tokens``: its usage, when read elsewhere)."""
        first = self.first_chunk - self.started if self.first_chunk is not None else None
        record_answer(self.span, self.status, usage, first, tokens)
        if error is not None:
            _fail(self.span, getattr(error, "code", None) or type(error).__name__, str(error)[:200])
        elif not complete:
            _fail(self.span, "stream_cut", "the answer did not reach its end")
        self.span.end()


class RequestTrace:
    """One request's trace. The SERVER span starts (back-dated to the request's arrival) once the
    signature has verified, so the signer's ``pw_traceparent`` can be its parent; a request refused
    before that gets a root span when it ends."""

    def __init__(self, tracing: Tracing, method: str, path: str, query: str, peer: str,
                 browser_traceparent: str | None, user_param: str):  # fmt: skip
        self.tracing = tracing
        self.started_ns = time.time_ns()
        self.method = method
        self.path = path
        self.query = query
        self.peer = peer
        self.user_param = user_param
        browser = parse_traceparent(browser_traceparent)
        self.links = (
            [Link(SpanContext(browser.trace_id, browser.span_id, is_remote=True),
                  {"parkway.link": "browser traceparent (untrusted)"})]
            if browser is not None else []
        )  # fmt: skip
        self.span: Span | None = None
        self.open_steps: list[Span] = []
        self._authorize: Span | None = None

    # --- the SERVER span -----------------------------------------------------------------------

    def _server_span(self, parent: TraceParent | None, route: str) -> Span:
        record_user = self.tracing.config.record_user
        dropped = () if record_user or not self.user_param else (self.user_param.lower(),)
        attributes: dict[str, Any] = {
            "http.request.method": self.method,
            "http.route": route,
            "url.path": self.path[:2048],
            "url.scheme": "http",
            "network.peer.address": self.peer,
        }
        query = redacted_query(self.query, HIDDEN_PARAMS, dropped)
        if query:
            attributes["url.query"] = query[:4096]
        return self.tracing.tracer.start_span(
            f"{self.method} {route}", context=_context(parent), kind=SpanKind.SERVER,
            attributes=attributes, links=self.links, start_time=self.started_ns,
        )  # fmt: skip

    def verified(self, route: str) -> None:
        """The signature verified: the signed query's ``pw_traceparent`` may be the parent now.
        The SERVER span starts (back-dated), and the authorization step, open until :meth:`planned`."""
        if self.span is not None:
            return
        signed = dict(parse_query(self.query)).get(TRACEPARENT_PARAM)
        self.span = self._server_span(parse_traceparent(signed), route)
        self._authorize = self.start_step("parkway.authorize", start_time=self.started_ns)

    def planned(self) -> None:
        """Signature, policy and the cache key passed: the authorization step ends."""
        self.end_step(self._authorize)
        self._authorize = None

    @property
    def context(self) -> SpanContext | None:
        return self.span.get_span_context() if self.span is not None else None

    # --- steps and calls -----------------------------------------------------------------------

    def start_step(self, name: str, start_time: int | None = None) -> Span | None:
        """An INTERNAL span for a step that can take time (limits, cache); end it with :meth:`end_step`."""
        if self.span is None:
            return None
        step = self.tracing.tracer.start_span(name, context=_context(self.span), start_time=start_time)
        self.open_steps.append(step)
        return step

    def end_step(self, step: Span | None, error: BaseException | None = None) -> None:
        if step is None:
            return
        if error is not None:
            _fail(step, getattr(error, "code", None) or type(error).__name__)
        step.end()
        self.open_steps.remove(step)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        span = self.start_step(name)
        try:
            yield
        except BaseException as exc:
            self.end_step(span, exc)
            raise
        self.end_step(span)

    def upstream_call(self, method: str, url: str, body: bytes | None, *, propagate: bool, now: float) -> UpstreamCall:
        """The CLIENT span of the request's upstream call; ``body`` None: it streams (see
        :meth:`UpstreamCall.watch_body`)."""
        assert self.span is not None, "a call goes upstream only after the signature verified"
        span = _start_call(self.tracing.tracer, self.span, method, url, body)
        operation = operation_name(url.split("/", 3)[-1] if url.count("/") >= 3 else "/")
        unnamed = operation if body is None and operation is not None else None
        return UpstreamCall(span, now, propagate, unnamed)

    def websocket(self, url: str) -> Span:
        """A WebSocket session's upstream side: a CLIENT span from the handshake to the close."""
        assert self.span is not None
        host = url.split("/", 3)[2].rsplit("@", 1)[-1]
        return self.tracing.tracer.start_span(
            "websocket session", context=_context(self.span), kind=SpanKind.CLIENT,
            attributes={"server.address": host, "url.path": "/" + url.split("/", 3)[-1].partition("?")[0]},
        )  # fmt: skip

    @staticmethod
    def end_websocket(span: Span, report: Any) -> None:
        """A session's figures (a :class:`proxy.websocket.session.SessionReport`) on its span."""
        figures = {
            "parkway.websocket.outcome": report.outcome,
            "parkway.websocket.subprotocol": report.subprotocol,
            "parkway.websocket.messages_from_client": report.from_client.messages,
            "parkway.websocket.messages_from_upstream": report.from_upstream.messages,
            "parkway.websocket.close_code_client": report.client_code,
            "parkway.websocket.close_code_upstream": report.upstream_code,
            "parkway.websocket.closed_by": report.closed_by,
        }
        for key, value in figures.items():
            if value is not None:
                span.set_attribute(key, value)
        if report.usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", report.usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", report.usage.completion_tokens)
        if not report.accepted or report.level == "error":
            _fail(span, report.outcome or "not_accepted")
        span.end()

    def created_job(self, job_id: str) -> None:
        if self.span is not None:
            self.span.set_attribute("parkway.job.id", job_id[:12])
            self.tracing.remember_job(job_id, self.span.get_span_context())

    # --- the end -------------------------------------------------------------------------------

    def finish(self, *, route: str, status: int | None, outcome: str, error_code: str | None,
               attributes: dict[str, Any]) -> None:  # fmt: skip
        """The request has ended: close what is open, record how it ended, end the SERVER span."""
        span = self.span or self._server_span(None, route)
        for step in self.open_steps:
            _fail(step, error_code or outcome)
            step.end()
        self.open_steps.clear()
        found = {**attributes, "http.response.status_code": status, "parkway.outcome": outcome}
        if error_code is not None:
            found["error.type"] = found["parkway.error.code"] = error_code
        span.set_attributes({k: v for k, v in found.items() if v is not None})
        # HTTP conventions: a server span is an error for a 5xx, or when no answer went out.
        if (status is not None and status >= 500) or (status is None and outcome not in ("ok", "preflight")):
            span.set_status(Status(StatusCode.ERROR, error_code or outcome))
        span.end()


def open_tracing(config: TelemetryConfig, metrics: Any) -> Tracing:
    """The tracer for ``config`` (enabled), counting into ``metrics`` (a :class:`proxy.metrics.Metrics`)."""
    return Tracing(config, dropped=metrics.spans_dropped, failures=metrics.span_exports_failed)
