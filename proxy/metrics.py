"""Prometheus metrics for one Parkway process (own registry per instance: with ``--workers N`` each
worker exposes its own on its own admin port).

Label values come from bounded sets only: configured credential ids (anything else is
``unknown``), status classes, outcome and error codes defined in :mod:`proxy.errors`.
No per-user or per-URL labels, so cardinality stays fixed however the proxy is used.

The metrics are :mod:`proxy.metric_types` (plain attributes updated on the Trio thread, exposed
by ``prometheus_client`` when scraped), except the two counters the OpenTelemetry export thread
updates, which keep ``prometheus_client``'s locked type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily

from .metric_types import Counter, Gauge, Histogram
from .telemetry.genai import GenAIMetrics

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Buckets spanning a local mock (sub-millisecond) to a slow LLM answer (minutes).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SESSION_BUCKETS = (0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)  # WebSocket sessions, seconds
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class _ReadAtScrape:
    """A counter with a ``true``/``false`` label read from two plain counts when scraped:
    nothing is done per connection for it (the upstream client keeps the counts)."""

    def __init__(self, name: str, documentation: str, label: str, counts: Callable[[], tuple[int, int]]):
        self.name, self.documentation, self.label, self.counts = name, documentation, label, counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        false, true = self.counts()
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        family.add_metric(["false"], false)
        family.add_metric(["true"], true)
        yield family


class Metrics:
    def __init__(
        self,
        open_connections: Callable[[], float] = lambda: 0,
        websocket_sessions: Callable[[], float] = lambda: 0,
        upstream_tls_handshakes: Callable[[], tuple[int, int]] = lambda: (0, 0),
        upstream_dns: Callable[[], tuple[int, int]] = lambda: (0, 0),
    ):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(
            _ReadAtScrape(
                "parkway_upstream_tls_handshakes",
                "TLS handshakes with upstreams, by whether they resumed a session.",
                "resumed",
                upstream_tls_handshakes,
            )
        )
        r.register(
            _ReadAtScrape(
                "parkway_upstream_dns",
                "Upstream host names a new connection needed, by whether a kept answer gave them "
                "(upstream_dns_ttl) or the resolver was asked.",
                "kept",
                upstream_dns,
            )
        )
        self.requests = Counter(
            "parkway_requests",
            "Requests answered, by credential, status class and outcome.",
            ["credential", "status_class", "outcome"],
            registry=r,
        )
        # Counted in a plain attribute (``metrics.in_flight += 1``: no Gauge.inc/dec and their lock on
        # every request), read when scraped.
        self.in_flight = 0
        self.in_flight_gauge = Gauge("parkway_streams_in_flight", "Upstream requests in flight.", registry=r)
        self.in_flight_gauge.set_function(lambda: self.in_flight)
        self.connections = Gauge("parkway_open_connections", "Open client connections.", registry=r)
        self.connections.set_function(open_connections)
        self.bytes = Counter("parkway_client_bytes", "Bytes exchanged with clients.", ["direction"], registry=r)
        self.ttfb = Histogram(
            "parkway_upstream_ttfb_seconds",
            "Time from request to the upstream's response head.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "parkway_request_duration_seconds", "Total request duration.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.overhead = Histogram(
            "parkway_added_latency_seconds",
            "Time spent in Parkway itself: before forwarding plus from upstream head to client head.",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter("parkway_upstream_errors", "Upstream failures by kind.", ["kind"], registry=r)
        self.refusals = Counter("parkway_refusals", "Refused requests by reason.", ["reason"], registry=r)
        self.tokens = Counter(
            "parkway_tokens", "LLM tokens reported in upstream usage objects.", ["credential", "kind"], registry=r
        )
        self.ws_sessions = Counter(
            "parkway_websocket_sessions",
            "WebSocket sessions that reached the relay, by credential and outcome.",
            ["credential", "outcome"],
            registry=r,
        )
        self.ws_active = Gauge("parkway_websocket_sessions_active", "WebSocket sessions open now.", registry=r)
        self.ws_active.set_function(websocket_sessions)
        self.ws_messages = Counter(
            "parkway_websocket_messages", "WebSocket messages relayed, by sender.", ["direction"], registry=r
        )
        self.ws_bytes = Counter(
            "parkway_websocket_bytes", "WebSocket message payload bytes relayed, by sender.", ["direction"], registry=r
        )
        self.ws_duration = Histogram(
            "parkway_websocket_session_duration_seconds",
            "WebSocket session duration, from the 101 to the close.",
            buckets=SESSION_BUCKETS,
            registry=r,
        )
        self.cache_requests = Counter(
            "parkway_cache_requests",
            "Cacheable requests by result: hit, miss, collapsed, bypass, unavailable.",
            ["result"],
            registry=r,
        )
        self.cache_stored = Counter("parkway_cache_stored", "Answers stored in the cache.", registry=r)
        self.cache_evictions = Counter(
            "parkway_cache_evictions", "Live cache entries pushed out by the byte bound.", registry=r
        )
        self.cache_tokens_saved = Counter(
            "parkway_cache_tokens_saved",
            "LLM tokens of answers served from the cache or collapsed.",
            ["credential", "kind"],
            registry=r,
        )
        self.cache_bytes = Gauge("parkway_cache_bytes", "Bytes held by the cache store.", registry=r)
        self.cache_entries = Gauge("parkway_cache_entries", "Entries held by the cache store.", registry=r)
        # Budgets (docs/budgets.md): what was charged per credential (never per user), and refusals.
        self.budget_tokens = Counter(
            "parkway_budget_tokens_charged", "Tokens charged to budgets, by credential.", ["credential"], registry=r
        )
        self.budget_usd = Counter(
            "parkway_budget_usd_charged", "USD charged to spend budgets, by credential.", ["credential"], registry=r
        )
        self.budget_refusals = Counter(
            "parkway_budget_refusals",
            "Requests refused because a budget could not cover them, by budget (user-day, credential-month...).",
            ["budget"],
            registry=r,
        )
        self.reloads = Counter("parkway_config_reloads", "Configuration reloads by result.", ["result"], registry=r)
        # Background jobs: the store's view (all processes sharing it) and this process's work.
        self.jobs = Gauge("parkway_jobs", "Jobs in the job store, by status.", ["status"], registry=r)
        self.jobs_oldest_queued_age = Gauge(
            "parkway_jobs_oldest_queued_age_seconds", "Age of the oldest queued job.", registry=r
        )
        self.jobs_deliveries_pending = Gauge(
            "parkway_jobs_deliveries_pending", "Jobs whose webhook delivery is not over.", registry=r
        )
        self.jobs_running = Gauge("parkway_jobs_running", "Jobs running in this process.", registry=r)
        self.jobs_created = Counter(
            "parkway_jobs_created",
            "Jobs accepted, by credential and mode (callback | poll).",
            ["credential", "mode"],
            registry=r,
        )
        self.job_runs = Counter(
            "parkway_job_runs",
            "Job runs that ended here, by outcome (completed, failed, requeued, lost).",
            ["outcome"],
            registry=r,
        )
        self.job_deliveries = Counter(
            "parkway_webhook_deliveries",
            "Webhook delivery attempts, by result (delivered, retry, stopped, failed).",
            ["result"],
            registry=r,
        )

        self.genai = GenAIMetrics(r)  # gen_ai_* (OpenTelemetry GenAI metrics, Prometheus naming)
        # Counted by the tracer's batch processor, whose export runs on its own thread: locked.
        self.spans_dropped = prometheus_client.Counter(
            "parkway_trace_spans_dropped",
            "Spans dropped: the export queue was full (collector down or slow).",
            registry=r,
        )
        self.span_exports_failed = prometheus_client.Counter(
            "parkway_trace_exports_failed", "Span batches the collector did not take.", registry=r
        )
        self.http_parser = Gauge(
            "parkway_http_parser", "The request-head parser new connections use (1), by name.", ["parser"], registry=r
        )
        # Label children looked up once: ``labels()`` costs as much as the increment it leads to.
        self.bytes_in = self.bytes.labels("in")
        self.bytes_out = self.bytes.labels("out")

    def set_http_parser(self, parser: str) -> None:
        for name in ("h11", "httptools"):
            self.http_parser.labels(name).set(1 if name == parser else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
