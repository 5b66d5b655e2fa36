"""LatencyMetrics renders what prometheus_client's Counter and Histogram render."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from r3e_tee.service.metrics import LatencyMetrics

BUCKETS = (0.001, 0.0025, 0.01, 0.5, 1, 10)


def _samples(text: str) -> dict[str, str]:
    """Sample lines without the _created ones (wall-clock times)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = value
    return out


def test_same_series_and_values_as_the_client_library() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    metrics = LatencyMetrics(
        counter="t_requests",
        counter_doc="requests",
        histogram="t_request_duration_seconds",
        histogram_doc="latency",
        labelnames=("method", "route", "status"),
        histogram_labels=2,
        buckets=BUCKETS,
        registry=ours,
    )
    counter = Counter("t_requests", "requests", ["method", "route", "status"], registry=theirs)
    histogram = Histogram(
        "t_request_duration_seconds", "latency", ["method", "route"], buckets=BUCKETS, registry=theirs
    )
    rng = random.Random(7)
    values = [*BUCKETS, 0.0, 20.0, *(rng.uniform(0, 12) for _ in range(500))]  # bounds are inclusive
    for value in values:
        labels = (rng.choice(("GET", "POST")), rng.choice(("/a", "/b/{x}")), rng.choice(("200", "503")))
        metrics.observe(labels, value)
        counter.labels(*labels).inc()
        histogram.labels(*labels[:2]).observe(value)
    mine, reference = _samples(generate_latest(ours).decode()), _samples(generate_latest(theirs).decode())
    assert mine.keys() == reference.keys()
    for name, value in reference.items():
        assert abs(float(mine[name]) - float(value)) < 1e-9, name
