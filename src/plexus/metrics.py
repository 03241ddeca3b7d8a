"""Prometheus metrics at `/metrics`.

Hot paths only bump plain integers in `Counters` (no locks, no label lookups
per delivery); a custom collector turns them into Prometheus samples when
`/metrics` is scraped. Only per-publish timings use real histograms, which
cost one observation per published message, never per delivery.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A publish takes tens of microseconds with the in-process engines and a
# round trip to Redis with the Redis engine: the low buckets tell those apart
# (the admin page's p50/p99 are estimated from them).
_LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class Counters:
    """Plain counters the server bumps as it works."""

    __slots__ = (
        "bytes_out",
        "closes",
        "commands",
        "deliveries",
        "emulation_posts",
        "errors",
        "gaps",
        "insufficient_state",
        "published",
        "repaired",
        "slow_consumers",
        "sse_connections",
    )

    def __init__(self) -> None:
        self.commands = 0  # client messages received
        self.published = 0  # messages stored and fanned out
        self.deliveries = 0  # frames queued to subscribers by fan-out
        self.bytes_out = 0  # bytes written to client sockets
        self.slow_consumers = 0
        self.gaps = 0  # channels found out of sync (a lost message or connection)
        self.repaired = 0  # messages delivered from history by a repair
        self.insufficient_state = 0  # subscriptions told to resubscribe
        self.errors: Counter[str] = Counter()  # error answers by code
        self.closes: Counter[int] = Counter()  # connection ends by close code
        self.sse_connections = 0  # open now over Server-Sent Events (the rest: WebSocket)
        # `POST /emulation` by (HTTP status, route: local, forwarded or none)
        self.emulation_posts: Counter[tuple[str, str]] = Counter()


class LatencyHistogram:
    """A histogram of seconds, observed without locks (one event loop writes it).

    prometheus_client's Histogram takes a mutex per bucket on every
    observation; this one costs a bisect and two additions.
    """

    __slots__ = ("bounds", "counts", "doc", "name", "total")

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.name = name
        self.doc = doc
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Record one duration."""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts per upper bound, as Prometheus wants them."""
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return buckets

    def family(self) -> HistogramMetricFamily:
        """The samples in Prometheus form (cumulative buckets)."""
        return HistogramMetricFamily(
            self.name, self.doc, buckets=self.buckets(), sum_value=self.total
        )


class CallStats:
    """The application's calls (proxies and hooks): how many, how they ended, how long.

    Attributes:
        calls: by (call, via, outcome): via `proxy` or `hook`; outcome
            `accepted`, `refused` or `failed`.
        errors: failed calls by (call, reason): `timeout`, `unreachable`,
            `status` (non-2xx), `bad_answer`, `exception` (a hook raised).
        latency: one histogram of seconds per call name.
    """

    __slots__ = ("calls", "errors", "latency")

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str, str]] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.latency: dict[str, LatencyHistogram] = {}

    def observe(self, call: str, via: str, outcome: str, seconds: float) -> None:
        """Count one call and its duration."""
        self.calls[call, via, outcome] += 1
        histogram = self.latency.get(call)
        if histogram is None:
            histogram = self.latency[call] = LatencyHistogram(
                "plexus_decision_seconds", "", _DECISION_BUCKETS
            )
        histogram.observe(seconds)

    def families(self) -> Iterator[Any]:
        """The samples in Prometheus form."""
        calls = CounterMetricFamily(
            "plexus_decision_calls",
            "Calls to the application (proxies and hooks) by call, via and outcome.",
            labels=["call", "via", "outcome"],
        )
        for (call, via, outcome), count in sorted(self.calls.items()):
            calls.add_metric([call, via, outcome], count)
        yield calls
        errors = CounterMetricFamily(
            "plexus_decision_errors",
            "Failed calls to the application by call and reason.",
            labels=["call", "reason"],
        )
        for (call, reason), count in sorted(self.errors.items()):
            errors.add_metric([call, reason], count)
        yield errors
        latency = HistogramMetricFamily(
            "plexus_decision_seconds",
            "Time calls to the application took, answer or failure.",
            labels=["call"],
        )
        for call, histogram in sorted(self.latency.items()):
            latency.add_metric([call], histogram.buckets(), histogram.total)
        yield latency


_DECISION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def percentile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """Estimate the `q` quantile (0 < q <= 1) of a histogram's observations, in seconds.

    `counts[i]` are the observations in bucket i (not cumulative; the last
    one is +Inf). Within a bucket the observations are taken as spread evenly
    (Prometheus' `histogram_quantile` does the same); in the +Inf bucket the
    answer is the highest bound. None when there is no observation.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    running = 0
    for index, count in enumerate(counts):
        if count and running + count >= rank:
            if index == len(bounds):
                return bounds[-1]
            low = bounds[index - 1] if index else 0.0
            return low + (bounds[index] - low) * (rank - running) / count
        running += count
    return bounds[-1]


class _Collector(Collector):
    def __init__(
        self,
        counters: Counters,
        gauges: Callable[[], dict[str, int]],
        histograms: tuple[LatencyHistogram, ...],
        decisions: CallStats,
    ) -> None:
        self._counters = counters
        self._gauges = gauges
        self._histograms = histograms
        self._decisions = decisions

    def collect(self) -> Iterator[Any]:
        for histogram in self._histograms:
            yield histogram.family()
        yield from self._decisions.families()
        c = self._counters
        for name, value in self._gauges().items():
            yield GaugeMetricFamily(f"plexus_{name}", f"Current number of {name}.", value=value)
        simple = (
            ("plexus_commands", "Client messages received.", c.commands),
            (
                "plexus_messages_published",
                "Messages published (stored and fanned out).",
                c.published,
            ),
            ("plexus_deliveries", "Message frames queued to subscribers.", c.deliveries),
            ("plexus_bytes_out", "Bytes written to client sockets.", c.bytes_out),
            ("plexus_slow_consumer_disconnects", "Connections closed with 4008.", c.slow_consumers),
            ("plexus_channel_gaps", "Channels found out of sync with their stream.", c.gaps),
            ("plexus_repaired_messages", "Messages delivered from history by repairs.", c.repaired),
            (
                "plexus_insufficient_state",
                "Subscriptions told to resubscribe (a gap history could not fill).",
                c.insufficient_state,
            ),
        )
        for name, doc, value in simple:
            yield CounterMetricFamily(name, doc, value=value)
        errors = CounterMetricFamily("plexus_errors", "Error answers by code.", labels=["code"])
        for code, count in sorted(c.errors.items()):
            errors.add_metric([code], count)
        yield errors
        closes = CounterMetricFamily(
            "plexus_connection_closes", "Ended connections by close code.", labels=["code"]
        )
        for close_code, count in sorted(c.closes.items()):
            closes.add_metric([str(close_code)], count)
        yield closes
        yield GaugeMetricFamily(
            "plexus_sse_connections",
            "Connections open over Server-Sent Events (counted in plexus_connections too).",
            value=c.sse_connections,
        )
        posts = CounterMetricFamily(
            "plexus_emulation_posts",
            "POST /emulation requests by status, and how they reached the session"
            " (local, forwarded to its node, or neither).",
            labels=["status", "route"],
        )
        for key, count in sorted(c.emulation_posts.items()):
            posts.add_metric(list(key), count)
        yield posts


class Metrics:
    """One server's metrics registry (a registry each, so servers can share a process)."""

    def __init__(self, gauges: Callable[[], dict[str, int]]) -> None:
        self.counters = Counters()
        self.publish_latency = LatencyHistogram(
            "plexus_publish_seconds",
            "Time the engine took to store and fan out one message.",
        )
        self.decisions = CallStats()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(
            _Collector(self.counters, gauges, (self.publish_latency,), self.decisions)
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
