"""Request and invocation metrics that cost a bisect and two list updates per event.

prometheus_client's labelled Counter and Histogram take a lock and walk every bucket on each
observation, twice per metric; on the warm invocation path that was several microseconds per
request. A :class:`LatencyMetrics` keeps, per label set, bucket counts and a sum in a plain
list, and renders at scrape time the same two families the client library would: a counter of
events (``<counter>_total``) and a histogram of their durations, whose labels may drop some of
the counter's (the HTTP histogram has no ``status``).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class LatencyMetrics(Collector):
    """A counter and a histogram of the same events, observed together.

    ``labelnames`` label the counter; the histogram uses the first ``histogram_labels`` of
    them. Observations come from any thread (a short lock); the registry reads a snapshot.
    """

    def __init__(
        self,
        *,
        counter: str,
        counter_doc: str,
        histogram: str,
        histogram_doc: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
        histogram_labels: int | None = None,
    ) -> None:
        self._counter = (counter, counter_doc)
        self._histogram = (histogram, histogram_doc)
        self._labelnames = list(labelnames)
        self._histogram_labels = len(self._labelnames) if histogram_labels is None else histogram_labels
        self._bounds = sorted(float(b) for b in buckets if b != math.inf)
        self._series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., +Inf count, sum
        self._created: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        index = bisect.bisect_left(self._bounds, seconds)  # le: the first bound >= seconds
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                if len(self._series) > 10_000:  # label values can be client-chosen: bound them
                    self._series.clear()
                    self._created.clear()
                series = self._series[labels] = [0.0] * (len(self._bounds) + 2)
                self._created[labels] = time.time()
            series[index] += 1
            series[-1] += seconds

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._counter[0], self._counter[1], labels=self._labelnames)
        yield HistogramMetricFamily(
            self._histogram[0], self._histogram[1], labels=self._labelnames[: self._histogram_labels]
        )

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = {labels: list(series) for labels, series in self._series.items()}
            created = dict(self._created)
        counter = CounterMetricFamily(self._counter[0], self._counter[1], labels=self._labelnames)
        merged: dict[tuple[str, ...], list[float]] = {}
        first: dict[tuple[str, ...], float] = {}
        for labels, series in snapshot.items():
            counter.add_metric(list(labels), sum(series[:-1]), created=created[labels])
            key = labels[: self._histogram_labels]
            into = merged.setdefault(key, [0.0] * len(series))
            for i, value in enumerate(series):
                into[i] += value
            first[key] = min(first.get(key, math.inf), created[labels])
        histogram = HistogramMetricFamily(
            self._histogram[0], self._histogram[1], labels=self._labelnames[: self._histogram_labels]
        )
        bounds = [*self._bounds, math.inf]
        for key, series in merged.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip(bounds, series[:-1], strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            histogram.add_metric(list(key), buckets, series[-1])
        yield counter
        yield histogram
