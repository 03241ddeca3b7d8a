"""The workloads. Each starts a fresh server, drives it from the load workers, and
returns one flat result dict (metrics plus parameters). All are bounded in
message count and in time, and target 127.0.0.1 only.

Server CPU is read around the measured phase only (after connecting,
subscribing and a short warm-up that lets Node's JIT and Python's lazy paths
settle), so connection set-up is not in the per-delivery figures.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import servers
from bench.loadgen import LoadGen, Reply, ns_array, source_addresses, split
from bench.servers import Server

Result = dict[str, Any]


@dataclass
class Context:
    """What every workload needs: the worker pool, CPU placement, where logs go."""

    loadgen: LoadGen
    sub_workers: list[int]
    pub_worker: int
    server_cpus: list[int] | None
    log_dir: Path
    sources: list[str] = field(default_factory=lambda: source_addresses(32))
    label: str = ""
    _last: float = 0.0

    def status(self, text: str, final: bool = False) -> None:
        """One-line progress display on stderr (rewritten in place on a terminal)."""
        now = time.monotonic()
        if not final and now - self._last < 0.25:
            return
        self._last = now
        line = f"[{self.label}] {text}"
        if sys.stderr.isatty():
            sys.stderr.write("\r\x1b[2K" + line + ("\n" if final else ""))
        elif final:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def percentile(values: list[int] | Any, q: float) -> float:
    """The q-th percentile (0..100) of `values` by nearest rank; 0.0 for no values."""
    if len(values) == 0:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return float(ordered[rank])


def _progress(ctx: Context, key: str, total: int, what: str) -> Callable[[dict[int, Reply]], None]:
    def show(latest: dict[int, Reply]) -> None:
        done = sum(int(m.get(key, 0)) for m in latest.values())
        pct = 100.0 * done / total if total else 100.0
        ctx.status(f"{what} {done:,}/{total:,} ({pct:.0f}%)")

    return show


class Session:
    """One server plus the connections the workload opened to it."""

    def __init__(self, ctx: Context, kind: str) -> None:
        self.ctx = ctx
        self.kind = kind
        ctx.status(f"starting {kind}")
        self.server: Server = servers.start(kind, ctx.log_dir, ctx.server_cpus)
        self.sys_fraction = 0.0  # kernel share of the server CPU in the last measured phase
        # CPU seconds the machine spent on neither the server nor the load client in the
        # last measured phase: softirq work and other people's processes (noise).
        self.others_cpu = 0.0
        self.phase_wall = 0.0  # seconds the last measured phase lasted

    def connect(
        self,
        n: int,
        channel: str | None,
        workers: list[int] | None = None,
        stop_after_failures: int = 0,
        timeout: float = 300.0,
        port: int | None = None,
        deflate: bool = False,
    ) -> tuple[int, list[str]]:
        """Open `n` connections spread over `workers` (subscribed to `channel` if given).

        `deflate`: the connections offer permessage-deflate, as browsers do.
        """
        ids = workers if workers is not None else self.ctx.sub_workers
        shares = split(n, len(ids))
        cmds: dict[int, Reply] = {}
        for k, (worker, share) in enumerate(zip(ids, shares, strict=True)):
            # Each worker takes its own slice of source addresses.
            sources = self.ctx.sources[k :: len(ids)] or self.ctx.sources
            cmds[worker] = {
                "op": "connect",
                "host": "127.0.0.1",
                "port": port or self.server.port,
                "path": self.server.prefix + "/ws",
                "n": share,
                "channel": channel,
                "sources": sources,
                # In-flight handshakes in all: below the smallest listen backlog
                # (aiohttp's 128), so no SYN is dropped and retried a second later.
                "concurrency": max(4, 96 // len(ids)),
                "timeout": 30.0,
                "stop_after_failures": stop_after_failures,
                "deflate": deflate,
            }
        answers = self.ctx.loadgen.call(
            cmds, timeout, _progress(self.ctx, "connected", n, f"{self.kind}: connecting")
        )
        connected = sum(a["connected"] for a in answers.values())
        errors = [e for a in answers.values() for e in a["errors"]]
        return connected, errors

    def reset(self, latency: bool = False) -> None:
        self.ctx.loadgen.all({"op": "reset", "latency": latency}, 30.0)

    def close(self) -> None:
        try:
            self.ctx.loadgen.all({"op": "close"}, 60.0)
        finally:
            self.server.stop()

    def check_alive(self) -> None:
        if not self.server.alive():
            raise RuntimeError(f"{self.kind} exited:\n{self.server.log_tail()}")


def _publish_and_wait(
    s: Session, publish: Reply, per_conn: int, subs: int, timeout: float, latency: bool = False
) -> tuple[Reply, list[Reply], float]:
    """Run `publish` on the publisher and wait for `per_conn` messages on every subscriber.

    Returns the publisher's answer, the subscribers' answers and the server CPU seconds.
    """
    ctx = s.ctx
    s.reset(latency=latency)
    busy0 = servers.machine_busy_seconds()
    t0 = time.monotonic()
    user0, sys0 = s.server.cpu_times()
    cmds: dict[int, Reply] = {
        w: {"op": "expect", "count": per_conn, "timeout": timeout} for w in ctx.sub_workers
    }
    cmds[ctx.pub_worker] = publish
    answers = ctx.loadgen.call(
        cmds,
        timeout + 30.0,
        _progress(ctx, "messages", per_conn * subs, f"{s.kind}: delivered"),
    )
    user1, sys1 = s.server.cpu_times()
    cpu = user1 - user0 + sys1 - sys0
    client = sum(a["cpu"] for a in answers.values())
    s.sys_fraction = (sys1 - sys0) / max(1e-9, cpu)
    s.others_cpu = servers.machine_busy_seconds() - busy0 - cpu - client
    s.phase_wall = time.monotonic() - t0
    pub = answers.pop(ctx.pub_worker)
    return pub, list(answers.values()), cpu


def _check_delivery(kind: str, subs_answers: list[Reply], per_conn: int) -> dict[str, Any]:
    got = sum(a["messages"] for a in subs_answers)
    low = min(a["min"] for a in subs_answers)
    closes: dict[str, int] = {}
    for a in subs_answers:
        for code, n in a["closes"].items():
            closes[str(code)] = closes.get(str(code), 0) + n
    problems = []
    if any(a["timed_out"] for a in subs_answers) or low < per_conn:
        problems.append(f"incomplete delivery (min {low}/{per_conn} per subscriber)")
    if closes:
        problems.append(f"connections closed: {closes}")
    order_errors = sum(a.get("order_errors", 0) for a in subs_answers)
    if order_errors:
        problems.append(f"{order_errors} messages out of offset order")
    if problems:
        print(f"  ! {kind}: " + "; ".join(problems), file=sys.stderr)
    return {
        "received": got,
        "min_per_sub": low,
        "closes": closes,
        "order_errors": order_errors,
        "complete": not problems,
    }


def fanout(
    ctx: Context,
    kind: str,
    subs: int,
    messages: int,
    size: int = 100,
    via: str = "ws",
    channel: str = "bench:fanout",
    workload: str = "fanout",
    *,
    chat: bool = False,
) -> Result:
    """Burst: `subs` subscribers on one channel, `messages` published as fast as possible.

    `chat`: chat-like messages (a nick and a line of words) instead of `size`
    bytes of padding, to subscribers that offer permessage-deflate (the
    `compression` workload).
    """
    ctx.label = f"{workload} subs={subs} {kind}"
    s = Session(ctx, kind)
    try:
        connected, errors = s.connect(subs, channel, deflate=chat)
        if connected < subs:
            raise RuntimeError(f"only {connected}/{subs} subscribers connected: {errors[:3]}")
        pub_port = s.server.publisher_port or s.server.port
        s.connect(1, None, [ctx.pub_worker], port=pub_port)
        base = {"op": "burst", "channel": channel, "size": size, "via": via, "window": 100}
        base["chat"] = chat
        base.update(host="127.0.0.1", port=pub_port, prefix=s.server.prefix, timeout=120.0)
        warm = min(50, messages)
        ctx.status(f"{kind}: warm-up")
        _publish_and_wait(s, {**base, "count": warm}, warm, subs, 60.0)
        rss = s.server.rss_bytes()
        pub, answers, cpu = _publish_and_wait(s, {**base, "count": messages}, messages, subs, 120.0)
        s.check_alive()
        delivery = _check_delivery(kind, answers, messages)
        deliveries = delivery["received"]
        last = max(a["last_ns"] for a in answers)
        wall = max(1e-9, (last - pub["t_start_ns"]) / 1e9)
        client_cpu = pub["cpu"] + sum(a["cpu"] for a in answers)
        result: Result = {
            "workload": workload,
            "server": kind,
            "subs": subs,
            "messages": messages,
            "size": size,
            "via": via,
            "deliveries": deliveries,
            "server_cpu_s": cpu,
            "cpu_s_per_1m": cpu / max(1, deliveries) * 1e6,
            "wall_s": wall,
            "deliveries_per_s": deliveries / wall,
            "publishes_per_s": messages / wall,
            # Utilisations over the whole measured phase, the window the CPU was read in.
            "server_cpu_util": cpu / s.phase_wall,
            "server_sys_frac": s.sys_fraction,
            "others_cpu_util": s.others_cpu / s.phase_wall,
            "client_cpu_s": client_cpu,
            "client_cpu_util": client_cpu / s.phase_wall,
            "server_rss_mb": rss / 2**20,
            "wire_bytes_per_delivery": sum(a["wire_bytes"] for a in answers) / max(1, deliveries),
            "publish_errors": pub["errors"],
            "first_error": pub["first_error"],
            **delivery,
        }
        ctx.status(
            f"{kind}: {result['cpu_s_per_1m']:.2f} CPU s/1M, "
            f"{result['deliveries_per_s']:,.0f} deliveries/s",
            final=True,
        )
        return result
    finally:
        s.close()


def steady(
    ctx: Context,
    kind: str,
    subs: int,
    rate: float,
    duration: float,
    size: int = 100,
    channel: str = "bench:steady",
) -> Result:
    """Steady fan-out at `rate` messages/s; subscribers measure publish-to-receive latency."""
    ctx.label = f"steady subs={subs} {rate:g}/s {kind}"
    s = Session(ctx, kind)
    try:
        connected, errors = s.connect(subs, channel)
        if connected < subs:
            raise RuntimeError(f"only {connected}/{subs} subscribers connected: {errors[:3]}")
        s.connect(1, None, [ctx.pub_worker])
        base = {"op": "steady", "channel": channel, "size": size, "rate": rate}
        warm_s = min(1.0, duration)
        ctx.status(f"{kind}: warm-up")
        _publish_and_wait(s, {**base, "duration": warm_s}, int(rate * warm_s), subs, 30.0)
        total = int(rate * duration)
        pub, answers, cpu = _publish_and_wait(
            s, {**base, "duration": duration}, total, subs, duration + 30.0, latency=True
        )
        s.check_alive()
        delivery = _check_delivery(kind, answers, total)
        lat = ns_array([a["latencies"] for a in answers])
        deliveries = delivery["received"]
        client_cpu = pub["cpu"] + sum(a["cpu"] for a in answers)
        result: Result = {
            "workload": "steady",
            "server": kind,
            "subs": subs,
            "rate": rate,
            "duration_s": duration,
            "size": size,
            "deliveries": deliveries,
            "server_cpu_s": cpu,
            "cpu_s_per_1m": cpu / max(1, deliveries) * 1e6,
            "server_cpu_util": cpu / s.phase_wall,
            "server_sys_frac": s.sys_fraction,
            "others_cpu_util": s.others_cpu / s.phase_wall,
            "client_cpu_util": client_cpu / s.phase_wall,
            "p50_ms": percentile(lat, 50) / 1e6,
            "p99_ms": percentile(lat, 99) / 1e6,
            "max_ms": (max(lat) if len(lat) else 0) / 1e6,
            "mean_ms": (statistics.fmean(lat) if len(lat) else 0.0) / 1e6,
            "publish_errors": pub["errors"],
            "first_error": pub["first_error"],
            **delivery,
        }
        ctx.status(
            f"{kind}: p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms", final=True
        )
        return result
    finally:
        s.close()


def roundtrip(
    ctx: Context,
    kind: str,
    clients: int,
    duration: float,
    mode: str = "publish",
    prefix: str = "bench:rt",
    workload: str = "roundtrip",
) -> Result:
    """`clients` connections each doing command -> answer in a loop for `duration` seconds."""
    ctx.label = f"roundtrip clients={clients} {mode} {kind}"
    s = Session(ctx, kind)
    try:
        connected, errors = s.connect(clients, None)
        if connected < clients:
            raise RuntimeError(f"only {connected}/{clients} clients connected: {errors[:3]}")
        cmd = {"op": "roundtrip", "mode": mode, "channel": prefix, "size": 100}
        ctx.status(f"{kind}: warm-up")
        ctx.loadgen.all({**cmd, "duration": min(1.0, duration)}, 30.0, ctx.sub_workers)
        busy0 = servers.machine_busy_seconds()
        cpu0 = s.server.cpu_seconds()
        t0 = time.monotonic()
        answers = ctx.loadgen.call(
            {w: {**cmd, "duration": duration} for w in ctx.sub_workers},
            duration + 30.0,
            lambda latest: ctx.status(
                f"{kind}: {sum(m.get('ops', 0) for m in latest.values()):,} round trips"
            ),
        )
        wall = time.monotonic() - t0
        cpu = s.server.cpu_seconds() - cpu0
        s.check_alive()
        ops = sum(a["ops"] for a in answers.values())
        rtts = ns_array([a["rtts"] for a in answers.values()])
        client_cpu = sum(a["cpu"] for a in answers.values())
        others = servers.machine_busy_seconds() - busy0 - cpu - client_cpu
        result: Result = {
            "workload": workload,
            "server": kind,
            "clients": clients,
            "mode": mode,
            "duration_s": duration,
            "ops": ops,
            "ops_per_s": ops / wall,
            "server_cpu_s": cpu,
            "cpu_us_per_op": cpu / max(1, ops) * 1e6,
            "server_cpu_util": cpu / wall,
            "client_cpu_util": client_cpu / wall,
            "others_cpu_util": others / wall,
            "p50_ms": percentile(rtts, 50) / 1e6,
            "p99_ms": percentile(rtts, 99) / 1e6,
            "errors": sum(a["errors"] for a in answers.values()),
        }
        ctx.status(
            f"{kind}: {result['ops_per_s']:,.0f} ops/s, {result['cpu_us_per_op']:.1f} CPU µs/op",
            final=True,
        )
        return result
    finally:
        s.close()


def idle(ctx: Context, kind: str, conns: int, workload: str = "idle") -> Result:
    """Open `conns` idle connections and measure the server's RSS growth per connection."""
    ctx.label = f"{workload} conns={conns} {kind}"
    s = Session(ctx, kind)
    try:
        # Against `*-deflate` servers the connections offer permessage-deflate.
        deflate = kind.endswith("-deflate")
        warm = 200
        # Load lazy code paths; kept open so nothing freed is reused.
        s.connect(warm, None, deflate=deflate)
        time.sleep(0.5)
        rss0 = s.server.rss_bytes()
        t0 = time.monotonic()
        connected, errors = s.connect(
            conns,
            None,
            stop_after_failures=50 if workload == "maxconn" else 0,
            timeout=900.0,
            deflate=deflate,
        )
        connect_s = time.monotonic() - t0
        time.sleep(1.0)
        rss1 = s.server.rss_bytes()
        cpu0 = s.server.cpu_seconds()
        time.sleep(2.0)
        idle_cpu = s.server.cpu_seconds() - cpu0
        s.check_alive()
        # Is the server still serving? One more connection must get its welcome.
        still_serving, _ = s.connect(1, None, [ctx.pub_worker])
        result: Result = {
            "workload": workload,
            "server": kind,
            "conns": conns,
            "connected": connected,
            "held": connected + warm,
            "connect_s": connect_s,
            "connects_per_s": connected / max(1e-9, connect_s),
            "rss_mb": rss1 / 2**20,
            "kb_per_conn": (rss1 - rss0) / max(1, connected) / 1024,
            "idle_cpu_util": idle_cpu / 2.0,
            "server_fds": s.server.open_files(),
            "still_serving": bool(still_serving),
            "errors": errors[:3],
        }
        ctx.status(f"{kind}: {connected:,} held, {result['kb_per_conn']:.1f} KB/conn", final=True)
        return result
    finally:
        s.close()
