"""proxy.metric_types against prometheus_client as the oracle: the same updates give the same
``/metrics`` text, byte for byte (families, HELP/TYPE, label escaping, buckets, ``_created``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any
from unittest import mock

import prometheus_client
import prometheus_client.metrics
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from proxy import metric_types, metrics
from proxy.metrics import LATENCY_BUCKETS, OVERHEAD_BUCKETS, Metrics
from proxy.record import RequestRecord, count_request
from proxy.relay.usage import Usage
from proxy.telemetry import genai
from proxy.websocket.session import SessionReport, Traffic

PROMETHEUS = SimpleNamespace(
    Counter=prometheus_client.Counter, Gauge=prometheus_client.Gauge, Histogram=prometheus_client.Histogram
)
OURS = SimpleNamespace(Counter=metric_types.Counter, Gauge=metric_types.Gauge, Histogram=metric_types.Histogram)


@contextmanager
def ticking_clock() -> Iterator[None]:
    """``time.time`` as a counter: each series' ``_created`` says when it was made, in order."""
    ticks = iter(range(1_700_000_000, 1_800_000_000))
    with mock.patch.object(time, "time", lambda: float(next(ticks)) + 0.125):
        yield


@contextmanager
def created_series(on: bool) -> Iterator[None]:
    before = prometheus_client.metrics._use_created
    (prometheus_client.enable_created_metrics if on else prometheus_client.disable_created_metrics)()
    try:
        yield
    finally:
        prometheus_client.metrics._use_created = before


def expositions(run: Callable[[SimpleNamespace], CollectorRegistry]) -> list[tuple[bytes, bytes]]:
    """``run`` with prometheus_client's types and with ours, from the same clock: both texts, with
    ``_created`` series and without."""
    out = []
    for created in (True, False):
        with created_series(created):
            texts = []
            for types in (PROMETHEUS, OURS):
                with ticking_clock():
                    texts.append(generate_latest(run(types)))
            out.append((texts[0], texts[1]))
    return out


# --- the types, one update at a time -------------------------------------------------------------

SPECS: list[tuple[str, str, tuple[str, ...], dict[str, Any]]] = [
    ("Counter", "plain_events", (), {}),
    ("Counter", "labelled_events_total", ("kind", "status_class"), {}),
    ("Gauge", "plain_level", (), {}),
    ("Gauge", "labelled_level", ("kind",), {}),
    ("Histogram", "plain_seconds", (), {"buckets": LATENCY_BUCKETS}),
    ("Histogram", "labelled_seconds", ("credential", "model"), {"buckets": OVERHEAD_BUCKETS}),
    ("Histogram", "ints_with_inf", ("kind",), {"buckets": (1, 4, 16, math.inf)}),
    ("Histogram", "below_zero", (), {"buckets": (-1.5, 0, 2.5)}),
]
METHODS = {"Counter": ["inc"], "Gauge": ["inc", "dec", "set", "set_function"], "Histogram": ["observe"]}
BOUNDS = [b for _, _, _, kw in SPECS for b in kw.get("buckets", ())]

label_values = st.one_of(
    st.sampled_from(["ok", "2xx", 'say "hi"', "back\\slash", "new\nline", "ü", ""]),
    st.text(max_size=6),
    st.integers(-3, 3),  # prometheus_client labels by str(value)
)
amounts = st.one_of(
    st.sampled_from(BOUNDS),  # exactly on a bucket's bound: ``amount <= bound`` counts it there
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1, max_value=400),
    st.integers(-5, 10**6),
)
operations = st.lists(
    st.tuples(
        st.integers(0, len(SPECS) - 1),
        st.sampled_from(["", "positional", "by_name", "wrong_count"]),
        st.lists(label_values, min_size=2, max_size=2),
        st.integers(0, 3),
        amounts,
    ),
    max_size=40,
)


def apply(types: SimpleNamespace, ops: list[tuple[int, str, list[Any], int, Any]]) -> CollectorRegistry:
    """Build the SPECS with ``types`` and run ``ops`` on them; an update either type refuses must
    be refused by both (the oracle decides), as ``errors`` records."""
    registry = CollectorRegistry(auto_describe=True)
    made = [getattr(types, kind)(name, f"The {name}, with a \\ and a\nnewline.", names, registry=registry, **kw)
            for kind, name, names, kw in SPECS]  # fmt: skip
    errors = []
    for index, labelling, values, which, amount in ops:
        kind, _, names, _ = SPECS[index]
        target = made[index]
        try:
            if labelling == "positional":
                target = target.labels(*values[: len(names)])
            elif labelling == "by_name":
                target = target.labels(**dict(zip(names, values)))
            elif labelling == "wrong_count":
                target = target.labels(*values[: len(names) + 1])
            method = METHODS[kind][which % len(METHODS[kind])]
            if method == "set_function":
                target.set_function(lambda amount=amount: amount)
            else:
                getattr(target, method)(amount)
        except (ValueError, OverflowError) as exc:
            errors.append(type(exc).__name__)
    registry.register(_Errors(errors))
    return registry


class _Errors:
    """The refused updates, as a family of the exposition (so both runs must agree on them too)."""

    def __init__(self, errors: list[str]):
        self.errors = errors

    def collect(self) -> list[Metric]:
        family = Metric("refused_updates", " ".join(self.errors) or "none", "untyped")
        family.add_sample("refused_updates", {}, len(self.errors))
        return [family]


@settings(max_examples=150, deadline=None)
@given(operations)
def test_the_same_updates_give_the_same_exposition(ops: list[tuple[int, str, list[Any], int, Any]]) -> None:
    for theirs, ours in expositions(lambda types: apply(types, ops)):
        assert ours == theirs


def test_the_exposition_oracle_sees_a_difference() -> None:
    """The comparison above can fail: one observation more on our side shows."""

    def skewed(types: SimpleNamespace) -> CollectorRegistry:
        return apply(types, [(4, "", [], 0, 0.003)] * (2 if types is OURS else 1))

    for theirs, ours in expositions(skewed):
        assert ours != theirs


def test_a_histogram_counts_a_value_on_a_bound_in_that_bucket_and_nan_in_none() -> None:
    registry = CollectorRegistry()
    h = metric_types.Histogram("h_seconds", "h", buckets=(0.5, 1.0), registry=registry)
    for amount in (0.5, 1.0, 1.0000001, math.nan):
        h.observe(amount)
    assert registry.get_sample_value("h_seconds_bucket", {"le": "0.5"}) == 1
    assert registry.get_sample_value("h_seconds_bucket", {"le": "1.0"}) == 2
    assert registry.get_sample_value("h_seconds_bucket", {"le": "+Inf"}) == 3
    assert registry.get_sample_value("h_seconds_count") == 3
    assert math.isnan(registry.get_sample_value("h_seconds_sum") or 0.0)


def test_misuse_is_refused_as_prometheus_client_refuses_it() -> None:
    registry = CollectorRegistry()
    labelled = metric_types.Counter("c", "c", ["kind"], registry=registry)
    plain = metric_types.Gauge("g", "g", registry=registry)
    with pytest.raises(ValueError, match="missing label values"):
        labelled.inc()
    with pytest.raises(ValueError, match="No label names"):
        plain.labels("x")
    with pytest.raises(ValueError, match="non-negative"):
        labelled.labels("a").inc(-1)
    with pytest.raises(ValueError):  # the registry's duplicate check sees our families' names
        metric_types.Counter("c_total", "again", registry=registry)
    assert labelled.labels("a") is labelled.labels(kind="a")  # one series, however it is named


# --- Parkway's metrics, as count_request fills them -----------------------------------------------

CREDENTIALS = SimpleNamespace(credential=lambda cid: object() if cid == "app" else None)
traffic = st.builds(Traffic, messages=st.integers(0, 50), bytes=st.integers(0, 10**6))
sessions = st.builds(
    SessionReport, accepted=st.booleans(), from_client=traffic, from_upstream=traffic, duration=st.floats(0, 4000)
)
records = st.builds(
    RequestRecord,
    started=st.just(100.0),
    bytes_in_start=st.just(0),
    bytes_out_start=st.just(0),
    credential=st.sampled_from([None, "app", "stranger"]),
    status=st.sampled_from([None, 101, 200, 304, 404, 429, 502]),
    ttfb=st.none() | st.floats(0, 400),
    outcome=st.sampled_from(["ok", "refused:rate_limited", "upstream_error", "client_gone", "preflight"]),
    error_code=st.none() | st.sampled_from(["rate_limited", 'odd"code', "upstream_timeout"]),
    overhead=st.floats(0, 0.2),
    usage=st.none() | st.builds(Usage, st.integers(0, 10**5), st.integers(0, 10**5), st.integers(0, 10**5)),
    session=st.none() | sessions,
    cache=st.none() | st.sampled_from(["hit", "miss", "stored", "collapsed", "bypass", "unavailable"]),
    completed=st.booleans(),
    tokens_saved=st.tuples(st.integers(0, 999), st.integers(0, 999)),
    first_chunk=st.none() | st.floats(100, 200),
    streamed=st.booleans(),
    model=st.none() | st.sampled_from(["gpt-4o-mini", "m\\2", "claude"]),
    upstream_path=st.none() | st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/health"]),
    bytes_in=st.integers(0, 10**7),
    bytes_out=st.integers(0, 10**7),
    duration=st.floats(0, 500),
)


def run_parkway(types: SimpleNamespace, requests: list[RequestRecord]) -> CollectorRegistry:
    """Parkway's :class:`Metrics` built on ``types`` (ours, or prometheus_client's as before), then
    the requests counted, a stream in flight, the parser and a job gauge set."""
    with (
        mock.patch.object(metrics, "Counter", types.Counter),
        mock.patch.object(metrics, "Gauge", types.Gauge),
        mock.patch.object(metrics, "Histogram", types.Histogram),
        mock.patch.object(genai, "Histogram", types.Histogram),
    ):
        m = Metrics(open_connections=lambda: 7, upstream_tls_handshakes=lambda: (3, 2))
    m.set_http_parser("httptools")
    m.in_flight += 1  # a plain count, read by the gauge when scraped
    for record in requests:
        m.in_flight += 1
        count_request(m, CREDENTIALS, record)  # type: ignore[arg-type]
        m.in_flight -= 1
    m.jobs.labels("queued").set(4)
    m.reloads.labels("ok").inc()
    return m.registry


@settings(max_examples=60, deadline=None)
@given(st.lists(records, max_size=12))
def test_parkway_metrics_expose_what_prometheus_client_types_did(requests: list[RequestRecord]) -> None:
    for theirs, ours in expositions(lambda types: run_parkway(types, requests)):
        assert ours == theirs


def test_only_the_export_thread_counters_keep_prometheus_client_types() -> None:
    """The tracer's batch processor counts on its own thread: those two keep their lock."""
    m = Metrics()
    for name in ("spans_dropped", "span_exports_failed"):
        assert isinstance(getattr(m, name), prometheus_client.Counter)
    assert isinstance(m.requests, metric_types.Counter) and isinstance(m.in_flight_gauge, metric_types.Gauge)


def test_streams_in_flight_is_read_from_the_plain_count_when_scraped() -> None:
    m = Metrics()
    m.in_flight += 3
    m.in_flight -= 1
    assert b"\nparkway_streams_in_flight 2.0\n" in generate_latest(m.registry)
