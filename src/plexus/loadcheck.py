"""`plexus bench`: a quick fan-out check of a running server, with the Python client.

N subscribers on one channel, one publisher sending M messages that carry a
send time; every subscriber must get every message, with consecutive offsets
(use a channel nobody else publishes on). It reports throughput and delivery
latency as seen from this process, so it measures a deployment end to end
(network, proxies, the server's settings). The load client shares this
machine and this process: for the server's own CPU cost per delivery use
`bench/` in the repository, which spreads a leaner client over processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from plexus.client import Client, ConnectionClosed, PlexusClientError, Subscription

# Subscribers connect this many at a time: a server's listen backlog (and
# max_connections_per_ip) would refuse a thousand handshakes at once.
CONNECT_BATCH = 50


@dataclass(frozen=True, slots=True)
class CheckOptions:
    """What `plexus bench` runs (validated by the CLI)."""

    url: str
    channel: str
    subscribers: int
    messages: int
    size: int = 100
    rate: float = 0.0  # messages/s; 0 = as fast as the server answers
    window: int = 64  # publishes in flight when rate is 0
    token: str | None = None
    timeout: float = 30.0


@dataclass(slots=True)
class CheckResult:
    """What a run measured.

    `out_of_order` counts messages whose offset did not follow the one before
    (a gap, a duplicate or a reordering); `complete` is False if any delivery
    was missing or out of order.
    """

    subscribers: int
    messages: int
    deliveries: int
    expected: int
    out_of_order: int
    wall_s: float
    deliveries_per_s: float
    publishes_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    complete: bool

    def as_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """The `q`-th percentile (nearest rank) of `values`, 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return ordered[rank]


Publisher = Callable[[dict[str, Any]], Awaitable[None]]


class _Receiver:
    """Counts one subscriber's messages and checks that their offsets have no gap.

    Offsets, not the publisher's sequence numbers, are checked: publishes
    through the HTTP API run concurrently, so the server may order them
    differently than they were sent, but every subscriber must see the
    channel's offsets one by one from its subscribe reply on.
    """

    __slots__ = ("got", "latencies", "next_offset", "out_of_order")

    def __init__(self, subscribed_at: int) -> None:
        self.got = 0
        self.next_offset = subscribed_at + 1
        self.out_of_order = 0
        self.latencies: list[float] = []

    async def run(self, sub: Subscription, total: int) -> None:
        while self.got < total:
            message = await sub.get(kind="message")
            now = time.perf_counter_ns()
            offset = message.get("offset")
            if offset != self.next_offset:
                self.out_of_order += 1
            if isinstance(offset, int):
                self.next_offset = offset + 1
            data = message.get("data")
            if not isinstance(data, dict) or "t" not in data:
                continue  # someone else's message on the channel
            self.got += 1
            self.latencies.append((now - data["t"]) / 1e6)


async def _connect_all(
    opts: CheckOptions, session: aiohttp.ClientSession, count: int
) -> list[Client]:
    clients: list[Client] = []
    try:
        for start in range(0, count, CONNECT_BATCH):
            batch = [
                Client(
                    opts.url,
                    token=opts.token,
                    timeout=opts.timeout,
                    session=session,
                    # A measurement: a dropped connection is a failure to report.
                    reconnect=False,
                )
                for _ in range(min(CONNECT_BATCH, count - start))
            ]
            results = await asyncio.gather(*(c.connect() for c in batch), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            clients += batch
    except BaseException:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        raise
    return clients


async def _publish_all(opts: CheckOptions, publish: Publisher) -> None:
    pad = "x" * max(0, opts.size - 40)
    if opts.rate > 0:
        start = time.monotonic()
        for seq in range(1, opts.messages + 1):
            delay = start + (seq - 1) / opts.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing to the requested rate
            await publish({"seq": seq, "t": time.perf_counter_ns(), "pad": pad})
        return
    # Tasks take their first step, which writes the frame, in creation order,
    # so messages leave in sequence; up to `window` of them await replies.
    slots = asyncio.Semaphore(opts.window)
    pending: set[asyncio.Task[None]] = set()

    async def one(data: dict[str, Any]) -> None:
        try:
            await publish(data)
        finally:
            slots.release()

    for seq in range(1, opts.messages + 1):
        await slots.acquire()
        task = asyncio.get_running_loop().create_task(
            one({"seq": seq, "t": time.perf_counter_ns(), "pad": pad})
        )
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)


async def run(
    opts: CheckOptions,
    *,
    publish: Publisher | None = None,
    progress: Callable[[str], None] | None = None,
) -> CheckResult:
    """Run the check against `opts.url`.

    Args:
        opts: what to run.
        publish: how to publish one message's data (default: a WebSocket
            client's `publish`); the CLI passes an HTTP API publisher for `--api`.
        progress: called with a line of text at each stage.

    Raises:
        PlexusClientError: the server refused a subscribe or a publish.
        ConnectionClosed, OSError, TimeoutError: a connection failed.
    """
    say = progress or (lambda text: None)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        say(f"connecting {opts.subscribers} subscribers")
        clients = await _connect_all(opts, session, opts.subscribers + 1)
        try:
            sender, subscribers = clients[0], clients[1:]
            subs = await asyncio.gather(*(c.subscribe(opts.channel) for c in subscribers))
            receivers = [_Receiver(int(sub.result.get("offset", 0))) for sub in subs]

            async def ws_publish(data: dict[str, Any]) -> None:
                await sender.publish(opts.channel, data)

            say(f"publishing {opts.messages} messages")
            started = time.perf_counter()
            consuming = [
                asyncio.get_running_loop().create_task(r.run(s, opts.messages))
                for r, s in zip(receivers, subs, strict=True)
            ]
            try:
                await asyncio.wait_for(_publish_all(opts, publish or ws_publish), opts.timeout)
                published = time.perf_counter() - started
                done, _ = await asyncio.wait(consuming, timeout=opts.timeout)
                for task in done:
                    failure = task.exception()
                    if failure is not None:
                        raise failure
            finally:
                for task in consuming:
                    task.cancel()
                await asyncio.gather(*consuming, return_exceptions=True)
            wall = time.perf_counter() - started
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    deliveries = sum(r.got for r in receivers)
    expected = opts.subscribers * opts.messages
    latencies = [ms for r in receivers for ms in r.latencies]
    out_of_order = sum(r.out_of_order for r in receivers)
    return CheckResult(
        subscribers=opts.subscribers,
        messages=opts.messages,
        deliveries=deliveries,
        expected=expected,
        out_of_order=out_of_order,
        wall_s=round(wall, 3),
        deliveries_per_s=round(deliveries / wall, 1) if wall > 0 else 0.0,
        publishes_per_s=round(opts.messages / published, 1) if published > 0 else 0.0,
        p50_ms=round(percentile(latencies, 50), 3),
        p99_ms=round(percentile(latencies, 99), 3),
        max_ms=round(max(latencies, default=0.0), 3),
        complete=deliveries == expected and out_of_order == 0,
    )


__all__ = [
    "CheckOptions",
    "CheckResult",
    "ConnectionClosed",
    "PlexusClientError",
    "percentile",
    "run",
]
