"""Counters, gauges and histograms for one thread, exposed by ``prometheus_client`` at scrape time.

``prometheus_client``'s types take a lock and check twice that a metric has its labels on every
update: about ten Python calls per ``observe``, for a process whose updates all run on the Trio
thread. These keep the same call shape (``labels(...)``, ``inc``, ``dec``, ``set``,
``set_function``, ``observe``) and the same exposition, but an update is one call: a float
added to an attribute, or a bucket found by ``bisect``. Each metric is a collector registered
in the given registry, so ``generate_latest`` writes the same families, samples and ``_created``
series, in the same order, as the ``prometheus_client`` type of the same name would.

Not thread-safe: a metric updated from another thread (the OpenTelemetry export thread) keeps
``prometheus_client``'s own type. Reading at scrape time from the Trio thread is safe.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, NoReturn, TypeVar

import prometheus_client.metrics
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

_Sample = tuple[str, dict[str, str], float]  # name suffix, extra labels (``le``), value


def _use_created() -> bool:
    """Whether ``_created`` series are exported: ``prometheus_client``'s switch
    (``PROMETHEUS_DISABLE_CREATED_SERIES``, ``disable_created_metrics()``), read at scrape time."""
    return bool(getattr(prometheus_client.metrics, "_use_created", True))


class CounterValue:
    """One counter series."""

    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount

    def samples(self) -> Iterable[_Sample]:
        yield "_total", {}, self.value
        if _use_created():
            yield "_created", {}, self.created


class GaugeValue:
    """One gauge series: a value, or a function read at scrape time."""

    __slots__ = ("value", "function")

    def __init__(self) -> None:
        self.value = 0.0
        self.function: Callable[[], float] | None = None

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)

    def set_function(self, function: Callable[[], float]) -> None:
        self.function = function

    def samples(self) -> Iterable[_Sample]:
        yield "", {}, float(self.function()) if self.function is not None else self.value


class HistogramValue:
    """One histogram series: a count per bucket (not cumulative: one add per observation), the sum."""

    __slots__ = ("bounds", "counts", "sum", "created", "first")

    def __init__(self, bounds: list[float]):
        self.bounds = bounds  # upper bounds, ending with +Inf
        self.first = bounds[0]
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        i = bisect_left(self.bounds, amount)  # the first bound >= amount: prometheus_client's ``amount <= bound``
        if i or amount <= self.first:  # NaN is in no bucket (bisect would put it in the first)
            self.counts[i] += 1
        self.sum += amount

    def samples(self) -> Iterable[_Sample]:
        total = 0.0
        for bound, count in zip(self.bounds, self.counts):
            total += count
            yield "_bucket", {"le": floatToGoString(bound)}, total
        yield "_count", {}, total
        if self.first >= 0:  # prometheus_client leaves the sum out when a bucket is negative
            yield "_sum", {}, self.sum
        if _use_created():
            yield "_created", {}, self.created


V = TypeVar("V", CounterValue, GaugeValue, HistogramValue)


class _Family(Generic[V]):
    """A metric and its series by label values; registered in ``registry`` as a collector."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.series: dict[tuple[str, ...], V] = {}  # by label values, in creation order (as exposed)
        self.single: V | None = None if self.labelnames else self.new_series()  # the series of a metric without labels
        registry.register(self)

    def new_series(self) -> V:
        raise NotImplementedError

    def labels(self, *values: object, **by_name: object) -> V:
        """The series of these label values, created on first use (and kept: label sets are bounded)."""
        try:
            return self.series[values]  # type: ignore[index]  # str values: one lookup
        except (KeyError, TypeError):
            return self._labels_slowly(values, by_name)

    def _labels_slowly(self, values: tuple[object, ...], by_name: dict[str, object]) -> V:
        if not self.labelnames:
            raise ValueError(f"No label names were set when constructing {self.kind}:{self.name}")
        if values and by_name:
            raise ValueError("Can't pass both *args and **kwargs")
        if by_name:
            if sorted(by_name) != sorted(self.labelnames):
                raise ValueError("Incorrect label names")
            values = tuple(by_name[name] for name in self.labelnames)
        elif len(values) != len(self.labelnames):
            raise ValueError("Incorrect label count")
        key = tuple(str(value) for value in values)
        found = self.series.get(key)
        if found is None:
            found = self.series[key] = self.new_series()
        return found

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, self.kind)]

    def collect(self) -> list[Metric]:
        metric = Metric(self.name, self.documentation, self.kind)
        everything = [((), self.single)] if self.single is not None else list(self.series.items())
        for values, series in everything:
            labels = dict(zip(self.labelnames, values))
            for suffix, extra, value in series.samples():
                metric.add_sample(self.name + suffix, {**labels, **extra} if extra else labels, value)
        return [metric]

    def _missing_labels(self, *args: object, **kwargs: object) -> NoReturn:
        raise ValueError(f"{self.kind} metric is missing label values")


# Without labels, a family's update methods are its one series' own (bound once: an update is one
# call); with labels they raise, as prometheus_client's do.


class Counter(_Family[CounterValue]):
    """``prometheus_client.Counter``: ``labels(...).inc(n)``, or ``inc(n)`` without labels."""

    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *, registry: CollectorRegistry):
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry)
        only = self.single
        self.inc: Callable[..., None] = only.inc if only is not None else self._missing_labels

    def new_series(self) -> CounterValue:
        return CounterValue()


class Gauge(_Family[GaugeValue]):
    """``prometheus_client.Gauge``: ``inc``, ``dec``, ``set``, ``set_function``."""

    kind = "gauge"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *, registry: CollectorRegistry):
        super().__init__(name, documentation, labelnames, registry)
        only, missing = self.single, self._missing_labels
        self.inc: Callable[..., None] = only.inc if only is not None else missing
        self.dec: Callable[..., None] = only.dec if only is not None else missing
        self.set: Callable[[float], None] = only.set if only is not None else missing
        self.set_function: Callable[[Callable[[], float]], None] = only.set_function if only is not None else missing

    def new_series(self) -> GaugeValue:
        return GaugeValue()


class Histogram(_Family[HistogramValue]):
    """``prometheus_client.Histogram`` with the given upper bounds (+Inf added)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ):
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        if bounds and bounds[-1] != math.inf:
            bounds.append(math.inf)
        if len(bounds) < 2:
            raise ValueError("Must have at least two buckets")
        self.bounds = bounds
        super().__init__(name, documentation, labelnames, registry)
        only = self.single
        self.observe: Callable[[float], None] = only.observe if only is not None else self._missing_labels

    def new_series(self) -> HistogramValue:
        return HistogramValue(self.bounds)
