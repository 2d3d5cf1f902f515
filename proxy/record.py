"""The record of one request: filled in as the request goes, then its one log line and its metrics.

Both read the same figures: :meth:`RequestRecord.settle` computes the byte counts and the
duration once, when the request ends.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import trio

from .config import Config
from .errors import ParkwayError
from .http.connection import RequestHead
from .jobs.background import job_id_from_path
from .metrics import Metrics
from .relay.usage import Usage
from .telemetry.model import operation_name
from .websocket.session import SessionReport

if TYPE_CHECKING:  # only imported when tracing is on (it loads OpenTelemetry)
    from .telemetry.tracing import RequestTrace

log = structlog.get_logger("parkway.request")


@dataclass(slots=True)
class RequestRecord:
    """What the one log line of a request reports; filled in as the request goes."""

    started: float
    bytes_in_start: int
    bytes_out_start: int
    credential: str | None = None
    client: str | None = None
    user: str | None = None
    upstream_host: str | None = None
    upstream_path: str | None = None
    status: int | None = None
    ttfb: float | None = None
    outcome: str = "ok"
    error: str | None = None
    error_code: str | None = None
    overhead: float = 0.0  # time spent in Parkway itself (see metrics.overhead)
    usage: Usage | None = None
    head_sent_at: float = 0.0
    expected_length: int | None = None  # the upstream's Content-Length, when it sent one
    completed: bool = False  # the whole response was written
    relayed: int = 0  # response body bytes written to the client, as framed on its connection
    client_watch: trio.CancelScope | None = None  # the task watching for the client to leave (handler)
    # The request's overall scope (handler): the first byte's deadline rides on it (only the request's own task
    # may lower it: gateway.forward, upstream.client).
    scope: trio.CancelScope | None = None
    failure: ParkwayError | None = None  # the first byte's timeout, when it cut the request (handler)
    session: SessionReport | None = None  # a WebSocket session's figures (status 101)
    cache: str | None = None  # hit | miss | stored | collapsed | bypass | unavailable; None: not cacheable
    tokens_saved: tuple[int, int] = (0, 0)  # prompt, completion tokens of an answer served without upstream
    budget: dict[str, Any] | None = None  # the budget's log fields: hold, charge, estimate (gateway.budget)
    first_chunk: float | None = None  # when the first body bytes of the upstream's answer were written
    streamed: bool = False  # the answer was an event stream
    model: str | None = None  # the model the answer named (GenAI metrics)
    trace: RequestTrace | None = None  # the request's spans, when tracing is on
    # The run's clock, read as one frame (trio.current_time is three): the handler binds the
    # current clock's method once per request; the request's timestamps are all read with it.
    clock: Callable[[], float] = trio.current_time
    # Set by settle() when the request ends.
    bytes_in: int = 0
    bytes_out: int = 0
    duration: float = 0.0

    def first_chunk_now(self) -> None:
        self.first_chunk = self.clock()

    def settle(self, bytes_in: int, bytes_out: int, now: float) -> None:
        """Fix the request's byte counts (from the connection's running totals) and its duration."""
        self.bytes_in = bytes_in - self.bytes_in_start
        self.bytes_out = bytes_out - self.bytes_out_start
        self.duration = now - self.started


def log_request(head: RequestHead, record: RequestRecord) -> None:
    """The request's one log line: info when it was served, warning otherwise."""
    ttfb = record.ttfb
    fields: dict[str, Any] = {
        "method": head.method,
        "client": record.client or head.peer,
        "user": record.user,
        "upstream_host": record.upstream_host,
        "upstream_path": record.upstream_path,
        "status": record.status,
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "ttfb_ms": round(ttfb * 1000, 1) if ttfb is not None else None,
        "duration_ms": round(record.duration * 1000, 1),
        "outcome": record.outcome,
    }
    if record.cache is not None:
        fields["cache"] = record.cache
    if record.error:
        fields["error"] = record.error
    if record.budget:
        fields.update(record.budget)
    if record.usage is not None:
        fields["prompt_tokens"] = record.usage.prompt_tokens
        fields["completion_tokens"] = record.usage.completion_tokens
    session = record.session
    if session is not None and session.accepted:
        fields.update(
            subprotocol=session.subprotocol,
            messages_from_client=session.from_client.messages,
            bytes_from_client=session.from_client.bytes,
            messages_from_upstream=session.from_upstream.messages,
            bytes_from_upstream=session.from_upstream.bytes,
            session_ms=round(session.duration * 1000, 1),
            client_close_code=session.client_code,
            upstream_close_code=session.upstream_code,
            closed_by=session.closed_by,
        )
        # An upstream that vanished is an error, never a success; the client leaving is not.
        {"error": log.error, "warning": log.warning}.get(session.level, log.info)("request", **fields)
    elif record.outcome in ("ok", "preflight"):
        log.info("request", **fields)
    else:
        log.warning("request", **fields)


def count_request(metrics: Metrics, config: Config, record: RequestRecord) -> None:
    """Metrics for one finished request; labels only from bounded sets."""
    m = metrics
    cred = record.credential
    label = "none" if cred is None else (cred if config.credential(cred) is not None else "unknown")
    status_class = f"{record.status // 100}xx" if record.status else "none"
    m.requests.labels(label, status_class, record.outcome).inc()
    m.bytes_in.inc(record.bytes_in)
    m.bytes_out.inc(record.bytes_out)
    m.duration.observe(record.duration)
    if record.ttfb is not None:
        m.ttfb.observe(record.ttfb)
        m.overhead.observe(record.overhead)
    if record.outcome.startswith("refused:"):
        m.refusals.labels(record.error_code or "unknown").inc()
    elif record.outcome == "upstream_error":
        m.upstream_errors.labels(record.error_code or "unknown").inc()
    session = record.session
    if session is not None and session.accepted:
        m.ws_sessions.labels(label, record.outcome).inc()
        m.ws_messages.labels("from_client").inc(session.from_client.messages)
        m.ws_messages.labels("from_upstream").inc(session.from_upstream.messages)
        m.ws_bytes.labels("from_client").inc(session.from_client.bytes)
        m.ws_bytes.labels("from_upstream").inc(session.from_upstream.bytes)
        m.ws_duration.observe(session.duration)
    if record.usage is not None:
        m.tokens.labels(label, "prompt").inc(record.usage.prompt_tokens)
        m.tokens.labels(label, "completion").inc(record.usage.completion_tokens)
    reached = record.ttfb is not None or record.outcome == "upstream_error"  # an upstream call was made
    if reached and session is None and record.upstream_path and operation_name(record.upstream_path):
        usage = record.usage
        m.genai.observe(
            label, record.model, record.outcome, duration=record.duration,
            first_chunk=record.first_chunk - record.started if record.first_chunk is not None else None,
            tokens=(usage.prompt_tokens, usage.completion_tokens) if usage is not None else None,
            streamed=record.streamed,
        )  # fmt: skip
    if record.cache is not None:
        m.cache_requests.labels("miss" if record.cache == "stored" else record.cache).inc()
        if record.cache == "stored":
            m.cache_stored.inc()
        elif record.cache in ("hit", "collapsed") and record.completed:
            m.cache_tokens_saved.labels(label, "prompt").inc(record.tokens_saved[0])
            m.cache_tokens_saved.labels(label, "completion").inc(record.tokens_saved[1])


_UNTRACED = nullcontext()


def traced(record: RequestRecord, name: str) -> AbstractContextManager[Any]:
    """An INTERNAL span around a step of the request, when tracing is on (else a shared no-op)."""
    return _UNTRACED if record.trace is None else record.trace.step(name)


def trace_route(head: RequestHead, config: Config) -> str:
    """The request's route for its SERVER span (a fixed set: never a job id, which grants access)."""
    prefix = config.server.public_path_prefix
    return f"{prefix}/jobs/{{id}}" if job_id_from_path(head.path, (prefix,)) is not None else f"{prefix}/"


def finish_trace(head: RequestHead, record: RequestRecord, config: Config, request_id: str) -> None:
    """End the request's trace with what its log line says (called only when tracing is on)."""
    trace = record.trace
    assert trace is not None
    route = trace_route(head, config)
    if route.endswith("/jobs/{id}"):
        trace.path, trace.query = route, ""
    trace.finish(
        route=route, status=record.status, outcome=record.outcome, error_code=record.error_code,
        attributes={
            "client.address": record.client or head.peer,
            "parkway.request_id": request_id,
            "parkway.credential": record.credential,
            "parkway.cache": record.cache,
            "enduser.id": record.user if config.telemetry.record_user else None,
        },
    )  # fmt: skip
