"""What the admin page costs the server: CPU per open page, beside a steady load.

    python -m bench.admin_cost [--channels 1000] [--subscribers 2000] [--rate 100]
                               [--viewers 100] [--seconds 15] [--repeat 3]

Starts one Plexus server (memory history, pinned to CPU 0 like the other
benchmarks), connects `--subscribers` clients spread over `--channels`
`bench:` channels and publishes `--rate` messages a second through the HTTP
API, round robin over the channels. Then it runs phases of `--seconds` in
which `--viewers` pages poll as the page does:

- `overview`: `GET /admin/api/overview` every second (the whole series first);
- `channel`: a channel page, `GET /admin/api/channel` every 2 s and
  `GET /admin/api/tail` every second (each viewer on a channel of its own,
  up to the node's 16 tails; more viewers share them).

The server's CPU seconds (utime + stime from /proc) over a phase, minus those
of a phase without viewers, divided by the viewers, is the cost of one open
page. Each viewer phase is compared with the phases without viewers just before and
after it, `--repeat` times (the machine is shared: single phases vary).

An in-process part first measures, with `time.process_time`, one overview
build and one sample tick (what enabling the page costs with nobody looking,
once a second) on hubs of `--inprocess-channels` channels. Talks to
127.0.0.1 only; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.loadgen import subscribe
from bench.servers import machine_busy_seconds, start
from bench.wsclient import Counters, WSConn, connect
from plexus.admin.tail import MAX_TAILS

PASSWORD = "bench-admin-password"


async def _subscribers(port: int, count: int, channels: int) -> list[WSConn]:
    counters = Counters()
    conns: list[WSConn] = []
    for index in range(count):
        conn = await connect("127.0.0.1", port, counters)
        await subscribe(conn, f"bench:c{index % channels}")
        conns.append(conn)
    return conns


async def _publisher(session: aiohttp.ClientSession, base: str, rate: float, channels: int) -> None:
    interval = 1.0 / rate
    sent = 0
    started = time.monotonic()
    while True:
        body = {"channel": f"bench:c{sent % channels}", "data": {"n": sent}}
        async with session.post(base + "/api/publish", json=body) as response:
            await response.read()
        sent += 1
        delay = started + sent * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # a steady rate


async def _login(base: str) -> str:
    """One session for every viewer (logins are rate limited per address)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(base + "/admin/api/login", json={"password": PASSWORD}) as r,
    ):
        assert r.status == 200, await r.text()
        return r.cookies["plexus_admin"].value


async def _viewer(base: str, cookie: str, mode: str, channel: str, stop: asyncio.Event) -> int:
    """Poll like one open admin page until `stop`; return how many requests it made."""
    requests = 0
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar, cookies={"plexus_admin": cookie}) as session:
        tick = 0
        full = "?full=1"
        tail, seq = "", 0
        while not stop.is_set():
            if mode == "overview":
                async with session.get(base + "/admin/api/overview" + full) as r:
                    await r.read()
                full = ""
                requests += 1
            else:
                if tick % 2 == 0:
                    async with session.get(
                        base + "/admin/api/channel", params={"name": channel}
                    ) as r:
                        await r.read()
                    requests += 1
                params = {"channel": channel, "tail": tail, "after": str(seq)}
                async with session.get(base + "/admin/api/tail", params=params) as r:
                    answer = await r.json()
                tail, seq = answer["tail"], answer["seq"]
                requests += 1
            tick += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)  # the page's poll interval
    return requests


async def _phase(server: Any, base: str, viewers: int, mode: str, seconds: float) -> dict[str, Any]:
    stop = asyncio.Event()
    cookie = await _login(base) if viewers else ""
    # Channel pages share the node's MAX_TAILS tails: viewers beyond share channels.
    tasks = [
        asyncio.create_task(_viewer(base, cookie, mode, f"bench:c{index % MAX_TAILS}", stop))
        for index in range(viewers)
    ]
    await asyncio.sleep(2.0)  # logins done, the first full overview fetched
    cpu0, busy0, wall0 = server.cpu_seconds(), machine_busy_seconds(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, busy1, wall1 = server.cpu_seconds(), machine_busy_seconds(), time.monotonic()
    stop.set()
    requests = sum(await asyncio.gather(*tasks))
    wall = wall1 - wall0
    return {
        "viewers": viewers,
        "mode": mode,
        "server_cpu_ms_per_s": round((cpu1 - cpu0) / wall * 1000, 2),
        "machine_busy": round((busy1 - busy0) / wall, 2),
        "requests": requests,
    }


async def external(args: argparse.Namespace, log_dir: Path) -> dict[str, list[float]]:
    """Per-viewer server CPU (ms per second), each viewer phase against the mean of
    the baseline phases (no viewer) just before and after it, `--repeat` times."""
    server = start("plexus", log_dir, cpus=[0], env_extra={"PLEXUS_ADMIN_PASSWORD": PASSWORD})
    base = f"http://127.0.0.1:{server.port}"
    per_viewer: dict[str, list[float]] = {"overview": [], "channel": []}
    try:
        conns = await _subscribers(server.port, args.subscribers, args.channels)
        async with aiohttp.ClientSession() as session:
            publisher = asyncio.create_task(_publisher(session, base, args.rate, args.channels))
            await asyncio.sleep(3.0)  # warm up: lazy imports, the first samples
            before = await _phase(server, base, 0, "-", args.seconds)
            print(json.dumps(before), flush=True)
            for _ in range(args.repeat):
                for mode in ("overview", "channel"):
                    result = await _phase(server, base, args.viewers, mode, args.seconds)
                    after = await _phase(server, base, 0, "-", args.seconds)
                    print(json.dumps(result), json.dumps(after), flush=True)
                    baseline = (before["server_cpu_ms_per_s"] + after["server_cpu_ms_per_s"]) / 2
                    cost = (result["server_cpu_ms_per_s"] - baseline) / args.viewers
                    per_viewer[mode].append(round(cost, 3))
                    before = after
            publisher.cancel()
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
    finally:
        server.stop()
    return per_viewer


class _Watcher:
    """A do-nothing hub subscriber (so that a channel has someone in it)."""

    def __init__(self, name: str) -> None:
        self.client_id = name
        self.user = None
        self.codec_index = 0
        self.push_frame = len

    def close(self, code: Any, reason: str) -> None:
        pass

    async def end_subscription(
        self, channel: str, reason: str, *, resubscribe: bool = False
    ) -> bool:
        return False


async def inprocess(channels: int, rounds: int) -> dict[str, float]:
    """CPU time of one overview build and of one sample tick, on a node whose hub
    tracks `channels` channels (one subscriber each), in this process."""
    from plexus.app import Server
    from plexus.config import Settings
    from plexus.hub import Subscription

    server = Server(Settings(port=0, engine="memory", admin_password=PASSWORD))
    await server.start()
    try:
        node, site = server.node, server.admin
        assert node is not None
        assert site is not None
        for index in range(channels):
            sub = Subscription(_Watcher(f"w{index}"), f"bench:c{index}")  # type: ignore[arg-type]
            await node.watch(sub)
        await site._build_overview(True)  # warm up
        started = time.process_time()
        for _ in range(rounds):
            await site._build_overview(False)
        build = (time.process_time() - started) / rounds
        started = time.process_time()
        for _ in range(rounds):
            site.sampler.take(
                time.time(),
                connections=len(node.peers),
                subscriptions=node.hub.subscriber_count() - len(site.tails),
                published=node.counters.published,
                deliveries=node.counters.deliveries,
                slow_consumers=node.counters.slow_consumers,
            )
        tick = (time.process_time() - started) / rounds
    finally:
        await server.stop()
    return {
        "channels": channels,
        "build_ms": round(build * 1000, 3),
        "tick_us": round(tick * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=1000)
    parser.add_argument("--subscribers", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=100.0, help="messages/s published")
    parser.add_argument("--viewers", type=int, default=100, help="pages open at once per phase")
    parser.add_argument("--seconds", type=float, default=15.0, help="per phase")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--inprocess-channels", default="1000,10000", help="hub sizes for the in-process part"
    )
    args = parser.parse_args()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, [1])  # the server has CPU 0
    log_dir = Path(tempfile.mkdtemp(prefix="plexus-admin-cost-"))

    builds = [
        asyncio.run(inprocess(int(n), rounds=50)) for n in args.inprocess_channels.split(",") if n
    ]
    per_viewer = asyncio.run(external(args, log_dir))
    print()
    for found in builds:
        print(
            f"  {found['channels']} channels: one overview build {found['build_ms']} ms of CPU,"
            f" one sample tick {found['tick_us']} µs"
        )
    print(
        f"  {args.subscribers} subscribers on {args.channels} channels, {args.rate:g} messages/s,"
        f" {args.viewers} pages open, {args.seconds:g} s phases, {args.repeat} repeats:"
    )
    for mode, costs in per_viewer.items():
        costs = sorted(costs)
        print(
            f"    {mode}: {statistics.median(costs):.3f} ms of server CPU per second per page"
            f" (runs: {', '.join(f'{c:.3f}' for c in costs)})"
        )


if __name__ == "__main__":
    main()
