"""What the admin overview shows, built from counters the server already keeps.

Each node keeps one `Sample` a second for the last ten minutes (a few
integers: connections, subscriptions, messages in and out, slow-consumer
closes, and the publish-latency histogram's counts of that second). The
overview asks every node (a cluster call) for its latest samples, its
counters and its busiest channels, then merges them here: sums per second
across nodes, percentiles from the summed histogram counts, and per channel
the sum of subscribers and the highest message rate (every node that
subscribes to a channel sees each of its messages once). Nothing here does
I/O: the node and the clock are passed in.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

from plexus.hub import Hub
from plexus.metrics import LatencyHistogram, percentile

SAMPLES_KEPT: Final = 600  # ten minutes at one a second
RECENT_SAMPLES: Final = 5  # sent with every poll: a page that polls every 1-2 s misses none
TOP_CHANNELS: Final = 50  # busiest channels each node reports
RATE_WINDOW: Final = 1.0  # seconds: channel rates are measured over at least this


@dataclass(frozen=True, slots=True)
class Sample:
    """One node's second: gauges at its end, rates over it.

    `latency` holds the publish-latency histogram's counts of publishes that
    completed within that second (not cumulative).
    """

    t: int
    connections: int
    subscriptions: int
    published: float  # messages per second published through this node
    deliveries: float  # frames per second queued to subscribers here
    slow_consumers: int  # connections closed with 4008 within the second
    latency: tuple[int, ...]

    def row(self) -> list[Any]:
        """The sample as a JSON array (the cluster call's compact form)."""
        return [
            self.t,
            self.connections,
            self.subscriptions,
            self.published,
            self.deliveries,
            self.slow_consumers,
            list(self.latency),
        ]


class Sampler:
    """Keeps a node's samples; `take` is called once a second.

    Args:
        histogram: the node's publish-latency histogram.
        now: the clock's current time (Unix seconds).
    """

    def __init__(self, histogram: LatencyHistogram, now: float) -> None:
        self.histogram = histogram
        self.samples: deque[Sample] = deque(maxlen=SAMPLES_KEPT)
        self._last_time = now
        self._last: tuple[int, int, int] | None = None
        self._last_latency = list(histogram.counts)

    def take(
        self,
        now: float,
        *,
        connections: int,
        subscriptions: int,
        published: int,
        deliveries: int,
        slow_consumers: int,
    ) -> Sample | None:
        """Record the second that ends at `now` from the node's cumulative counters.

        The first call only sets the baseline; a second whose second number was
        already recorded (a tick that came early) is skipped.
        """
        counts = (published, deliveries, slow_consumers)
        latency = list(self.histogram.counts)
        last, last_time, last_latency = self._last, self._last_time, self._last_latency
        self._last, self._last_time, self._last_latency = counts, now, latency
        second = int(now)
        if last is None or now <= last_time:
            return None
        if self.samples and second < self.samples[-1].t - 60:
            self.samples.clear()  # the clock was set back: start over rather than wait
        if self.samples and self.samples[-1].t >= second:
            return None
        elapsed = now - last_time
        sample = Sample(
            t=second,
            connections=connections,
            subscriptions=subscriptions,
            published=round((published - last[0]) / elapsed, 2),
            deliveries=round((deliveries - last[1]) / elapsed, 2),
            slow_consumers=max(0, slow_consumers - last[2]),
            latency=tuple(max(0, a - b) for a, b in zip(latency, last_latency, strict=True)),
        )
        self.samples.append(sample)
        return sample

    def rows(self, full: bool) -> list[list[Any]]:
        """Every kept sample (`full`) or the last few, oldest first, as JSON arrays."""
        samples = list(self.samples) if full else list(self.samples)[-RECENT_SAMPLES:]
        return [sample.row() for sample in samples]


class ChannelRates:
    """Message rates of a node's channels, measured between two looks.

    The hub counts each channel's messages (one increment per message); a
    look compares the counts with those of an earlier look at least
    `RATE_WINDOW` old, so looks made in quick succession (two pages polling)
    do not shrink the window to nothing.
    """

    def __init__(self) -> None:
        self._base: dict[str, int] = {}
        self._base_time: float | None = None

    def top(self, hub: Hub, now: float, limit: int, hidden: dict[str, int]) -> list[list[Any]]:
        """The `limit` busiest channels with subscribers: `[name, subscribers, messages, rate]`.

        `hidden` counts subscriptions per channel not to show (the admin's own
        tails). Ordered by rate, then subscribers.
        """
        base, base_time = self._base, self._base_time
        counts: dict[str, int] = {}
        rows: list[tuple[float, int, str, int]] = []
        elapsed = now - base_time if base_time is not None else 0.0
        for channel in hub.tracked():
            name = channel.name
            messages = channel.messages
            counts[name] = messages
            subscribers = len(channel.subs) - hidden.get(name, 0)
            if subscribers <= 0:
                continue
            rate = 0.0
            if elapsed > 0:
                before = base.get(name, 0)
                if before > messages:  # forgotten and tracked again since: counted from 0
                    before = 0
                rate = (messages - before) / elapsed
            rows.append((rate, subscribers, name, messages))
        if base_time is None or now - base_time >= RATE_WINDOW:
            self._base, self._base_time = counts, now
        busiest = heapq.nlargest(limit, rows)
        return [[name, subs, messages, round(rate, 2)] for rate, subs, name, messages in busiest]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def merge(
    answers: list[dict[str, Any]],
    registry: list[dict[str, Any]],
    bounds: tuple[float, ...],
    top: int = 20,
) -> dict[str, Any]:
    """The overview from every node's snapshot (`answers`) and the registry of nodes.

    A node in the registry that did not answer in time is listed from its
    last report, marked `"stale": true`. The series covers the seconds every
    answering node has reported, so its newest point never lacks a node.
    """
    nodes: list[dict[str, Any]] = []
    by_second: dict[int, list[Any]] = {}
    newest: list[int] = []
    channels: dict[str, list[Any]] = {}
    answered = set()
    for answer in answers:
        info = dict(answer["info"])
        answered.add(info.get("node"))
        rows = answer.get("samples") or []
        latest = rows[-1] if rows else None
        info["in_rate"] = latest[3] if latest else 0.0
        info["out_rate"] = latest[4] if latest else 0.0
        info["stale"] = False
        nodes.append(info)
        if rows:
            newest.append(rows[-1][0])
        for t, conns, subs, published, deliveries, slow, latency in rows:
            point = by_second.get(t)
            if point is None:
                by_second[t] = [conns, subs, published, deliveries, slow, list(latency)]
            else:
                point[0] += conns
                point[1] += subs
                point[2] += published
                point[3] += deliveries
                point[4] += slow
                point[5] = [a + b for a, b in zip(point[5], latency, strict=True)]
        for name, subs, messages, rate in answer.get("channels") or []:
            found = channels.get(name)
            if found is None:
                channels[name] = [subs, messages, rate]
            else:
                found[0] += subs
                found[1] = max(found[1], messages)
                found[2] = max(found[2], rate)
    for entry in registry:
        if entry.get("node") not in answered:
            nodes.append({**entry, "in_rate": None, "out_rate": None, "stale": True})
    nodes.sort(key=lambda n: str(n.get("node")))
    until = min(newest) if newest else None
    series = [
        {
            "t": t,
            "connections": point[0],
            "subscriptions": point[1],
            "published": round(point[2], 2),
            "deliveries": round(point[3], 2),
            "slow_consumers": point[4],
            "p50": _ms(percentile(bounds, point[5], 0.5)),
            "p99": _ms(percentile(bounds, point[5], 0.99)),
        }
        for t, point in sorted(by_second.items())
        if until is not None and t <= until
    ]
    busiest = sorted(channels.items(), key=lambda item: (-item[1][2], -item[1][0], item[0]))[:top]
    live = [n for n in nodes if not n["stale"]]
    return {
        "totals": {
            "nodes": len(nodes),
            "connections": sum(int(n.get("connections", 0)) for n in live),
            "subscriptions": sum(int(n.get("subscriptions", 0)) for n in live),
            "in_rate": round(sum(float(n["in_rate"]) for n in live), 2),
            "out_rate": round(sum(float(n["out_rate"]) for n in live), 2),
            "slow_consumers": sum(int(n.get("slow_consumers", 0)) for n in live),
        },
        "nodes": nodes,
        "series": series,
        "channels": [
            {"channel": name, "subscribers": subs, "messages": messages, "rate": rate}
            for name, (subs, messages, rate) in busiest
        ],
    }
