"""The lock-free latency histogram renders as a Prometheus histogram."""

from __future__ import annotations

import pytest

from plexus.metrics import LatencyHistogram, Metrics, percentile


def test_latency_histogram_buckets_are_cumulative() -> None:
    histogram = LatencyHistogram("t_seconds", "test", bounds=(0.01, 0.1, 1.0))
    for value in (0.005, 0.01, 0.05, 0.5, 5.0):
        histogram.observe(value)
    family = histogram.family()
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "t_seconds_bucket"}
    assert buckets == {"0.01": 2, "0.1": 3, "1.0": 4, "+Inf": 5}
    count = next(s.value for s in family.samples if s.name == "t_seconds_count")
    total = next(s.value for s in family.samples if s.name == "t_seconds_sum")
    assert count == 5
    assert abs(total - 5.565) < 1e-9


def test_metrics_render_prometheus_text() -> None:
    metrics = Metrics(lambda: {"connections": 3})
    metrics.publish_latency.observe(0.002)
    metrics.counters.errors["bad_request"] += 2
    text = metrics.render().decode()
    assert "plexus_connections 3.0" in text
    assert 'plexus_errors_total{code="bad_request"} 2.0' in text
    assert "plexus_publish_seconds_count 1.0" in text


def test_percentile_interpolates_within_the_bucket() -> None:
    bounds = (0.001, 0.01, 0.1)
    # 10 in (0, 1 ms], 10 in (1, 10 ms], nothing above.
    counts = [10, 10, 0, 0]
    assert percentile(bounds, counts, 0.25) == pytest.approx(0.0005)
    assert percentile(bounds, counts, 0.5) == pytest.approx(0.001)
    assert percentile(bounds, counts, 0.75) == pytest.approx(0.0055)
    assert percentile(bounds, counts, 1.0) == pytest.approx(0.01)


def test_percentile_of_nothing_and_of_the_overflow_bucket() -> None:
    bounds = (0.001, 0.01)
    assert percentile(bounds, [0, 0, 0], 0.5) is None
    assert percentile(bounds, [0, 0, 4], 0.99) == 0.01  # above every bound: the highest
    assert percentile(bounds, [99, 0, 1], 0.99) == pytest.approx(0.001)  # rank 99: the first
