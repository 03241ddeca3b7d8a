"""`python -m bench`: run the workloads against Plexus and the Node ws peer, print the table.

Examples:
    python -m bench --quick                       # every default workload, small sizes
    python -m bench fanout --subs 1000,5000       # one workload, chosen sizes
    python -m bench --server plexus roundtrip     # Plexus alone
    python -m bench maxconn --max-conns 19000     # the long one, not in the defaults
    python -m bench soak --quick                  # the soak (its own options: soak --help)
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import report, servers, workloads
from bench.loadgen import LoadGen

DEFAULT_WORKLOADS = ("fanout", "steady", "roundtrip", "idle", "history", "compression")
# Not in the defaults: `maxconn` is long; `scaleout` and `durable` need redis-server.
ALL_WORKLOADS = (*DEFAULT_WORKLOADS, "maxconn", "scaleout", "durable")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


DURABLE_SERVERS = ("plexus", "plexus-sqlite", "plexus-redis")


def durable_servers(text: str) -> list[str]:
    """`--durable-servers`: some of DURABLE_SERVERS, comma-separated."""
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in DURABLE_SERVERS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"expected some of {', '.join(DURABLE_SERVERS)}, got {text!r}"
        )
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "workloads",
        nargs="*",
        metavar="WORKLOAD",
        help=f"any of {', '.join(ALL_WORKLOADS)} (default: {' '.join(DEFAULT_WORKLOADS)})",
    )
    p.add_argument(
        "--server",
        choices=("plexus", "node", "floor", "both", "asgi", "plexus-asgi"),
        default="both",
        help="both: plexus and node; asgi: plexus and plexus-asgi (mounted in FastAPI, uvicorn)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, a few minutes in all")
    p.add_argument("--subs", type=ints, help="fanout subscriber counts (default 1000,5000)")
    p.add_argument(
        "--deliveries",
        type=int,
        help="fanout deliveries per run; messages = deliveries / subs (default 2M, quick 500k)",
    )
    p.add_argument("--messages", type=int, help="fanout messages per run (overrides --deliveries)")
    p.add_argument("--via", choices=("ws", "http"), default="ws", help="how fanout publishes")
    p.add_argument("--size", type=int, default=100, help="approximate payload bytes (default 100)")
    p.add_argument("--steady-subs", type=ints, help="steady subscriber counts (default 1000)")
    p.add_argument("--rate", type=float, default=50.0, help="steady messages/s (default 50)")
    p.add_argument("--duration", type=float, help="steady seconds (default 10, quick 5)")
    p.add_argument("--rt-clients", type=int, default=100, help="roundtrip clients (default 100)")
    p.add_argument("--rt-mode", choices=("publish", "ping"), default="publish")
    p.add_argument("--rt-duration", type=float, help="roundtrip seconds (default 10, quick 3)")
    p.add_argument(
        "--durable-servers",
        type=durable_servers,
        default=list(DURABLE_SERVERS),
        help="durable: the history engines compared (default all three)",
    )
    p.add_argument("--idle-conns", type=int, default=10_000, help="idle connections (10000)")
    p.add_argument("--max-conns", type=int, default=19_000, help="maxconn target (19000)")
    p.add_argument("--history-subs", type=ints, help="history subscriber counts (default 1000)")
    p.add_argument(
        "--repeat", type=int, default=1, help="runs per server and size; the table shows medians"
    )
    p.add_argument("--workers", type=int, help="load worker processes for subscribers")
    p.add_argument("--no-pin", action="store_true", help="do not pin server/load to CPUs")
    p.add_argument("--out", type=Path, default=servers.BENCH_DIR / "results")
    p.add_argument("--plot", action="store_true", help="also write the p99-vs-subscribers PNG")
    args = p.parse_args(argv)
    unknown = set(args.workloads) - set(ALL_WORKLOADS)
    if unknown:
        p.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    return args


Run = tuple[str, str, Callable[[workloads.Context, str], Any]]


def plan(args: argparse.Namespace) -> list[Run]:
    """The runs, in order: (group title, server kind, run function), servers side by side."""
    quick = args.quick
    names = args.workloads or list(DEFAULT_WORKLOADS)
    kinds = {"both": ["plexus", "node"], "asgi": ["plexus", "plexus-asgi"]}.get(
        args.server, [args.server]
    )
    runs: list[Run] = []

    def each(
        group: str, fn: Callable[[workloads.Context, str], Any], only: list[str] | None = None
    ) -> None:
        for _ in range(args.repeat):  # interleaved: A B A B, so drift hits both alike
            for kind in only or kinds:
                runs.append((group, kind, fn))

    for name in names:
        if name == "fanout":
            for subs in args.subs or [1000, 5000]:
                deliveries = args.deliveries or (500_000 if quick else 2_000_000)
                messages = args.messages or max(20, deliveries // subs)

                def fan(ctx: workloads.Context, kind: str, s: int = subs, m: int = messages) -> Any:
                    return workloads.fanout(ctx, kind, s, m, args.size, args.via)

                each(f"fanout subs={subs} messages={messages} via={args.via}", fan)
        elif name == "steady":
            duration = args.duration or (5.0 if quick else 10.0)
            for subs in args.steady_subs or [1000]:

                def st(
                    ctx: workloads.Context, kind: str, s: int = subs, d: float = duration
                ) -> Any:
                    return workloads.steady(ctx, kind, s, args.rate, d, args.size)

                # With the floor beside them: the cost of one bare write per delivery.
                only = [*kinds, "floor"] if args.server == "both" else None
                each(f"steady subs={subs} rate={args.rate:g}/s duration={duration:g}s", st, only)
        elif name == "roundtrip":
            rt_duration = args.rt_duration or (3.0 if quick else 10.0)

            def rt(ctx: workloads.Context, kind: str, d: float = rt_duration) -> Any:
                return workloads.roundtrip(ctx, kind, args.rt_clients, d, args.rt_mode)

            each(f"roundtrip clients={args.rt_clients} mode={args.rt_mode} {rt_duration:g}s", rt)
        elif name == "idle":

            def idl(ctx: workloads.Context, kind: str) -> Any:
                return workloads.idle(ctx, kind, args.idle_conns)

            # Plexus with compression on too, to clients that offer it.
            with_deflate = [*kinds, "plexus-deflate"] if "plexus" in kinds else kinds
            each(f"idle conns={args.idle_conns}", idl, with_deflate)
        elif name == "maxconn":

            def mx(ctx: workloads.Context, kind: str) -> Any:
                return workloads.idle(ctx, kind, args.max_conns, workload="maxconn")

            each(f"maxconn target={args.max_conns}", mx)
        elif name == "scaleout" and "plexus" in kinds:
            # The delivering node's CPU per delivery when another node published
            # (through Redis), beside one node doing it all in memory.
            for subs in args.subs or [1000]:
                deliveries = args.deliveries or (500_000 if quick else 2_000_000)
                messages = args.messages or max(20, deliveries // subs)
                for channel in ("bench:fanout", "benchhist:fanout"):

                    def so(
                        ctx: workloads.Context,
                        kind: str,
                        s: int = subs,
                        m: int = messages,
                        c: str = channel,
                    ) -> Any:
                        return workloads.fanout(ctx, kind, s, m, args.size, args.via, c, "scaleout")

                    group = f"scaleout subs={subs} messages={messages} {channel} (memory vs redis)"
                    each(group, so, ["plexus", "plexus-redis"])
        elif name == "durable" and "plexus" in kinds:
            # Publish round trips into channels with history: memory, SQLite, Redis.
            rt_duration = args.rt_duration or (3.0 if quick else 10.0)

            def dur(ctx: workloads.Context, kind: str, d: float = rt_duration) -> Any:
                return workloads.roundtrip(
                    ctx, kind, args.rt_clients, d, "publish", "benchhist:rt", "durable"
                )

            group = f"durable clients={args.rt_clients} publish {rt_duration:g}s"
            each(group, dur, args.durable_servers)
        elif name == "compression":
            # Chat-like JSON to subscribers that offer permessage-deflate, each
            # server without and with compression.
            for subs in args.subs or [1000]:
                deliveries = args.deliveries or (100_000 if quick else 500_000)
                messages = args.messages or max(20, deliveries // subs)

                def comp(
                    ctx: workloads.Context, kind: str, s: int = subs, m: int = messages
                ) -> Any:
                    return workloads.fanout(
                        ctx, kind, s, m, channel="bench:chat", workload="compression", chat=True
                    )

                deflating = {
                    "plexus": ["plexus", "plexus-deflate"],
                    "node": ["node", "node-deflate"],
                }
                group = f"compression subs={subs} messages={messages} chat JSON"
                each(group, comp, [k for kind in kinds for k in deflating.get(kind, [])])
        elif name == "history" and "plexus" in kinds:
            for subs in args.history_subs or [1000]:
                # As long as fanout's: shorter runs measured mostly noise.
                deliveries = args.deliveries or (500_000 if quick else 2_000_000)
                messages = args.messages or max(20, deliveries // subs)

                def hist(
                    ctx: workloads.Context, kind: str, s: int = subs, m: int = messages
                ) -> Any:
                    return workloads.fanout(
                        ctx, kind, s, m, args.size, args.via, "benchhist:fanout", "history"
                    )

                group = f"history subs={subs} messages={messages} (memory vs sqlite)"
                each(group, hist, ["plexus", "plexus-sqlite"])
    return runs


def version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if "soak" in given:
        # One server through rounds of churn and attacks: a run of its own
        # (bench/soak.py), not a side-by-side comparison with the peers.
        from bench import soak

        return soak.main([arg for arg in given if arg != "soak"])
    args = parse_args(argv)
    runs = plan(args)
    if not runs:
        print("nothing to run", file=sys.stderr)
        return 2
    ncpu = os.cpu_count() or 1
    pin = not args.no_pin and ncpu >= 2
    server_cpus = [0] if pin else None
    load_cpus = list(range(1, ncpu)) if pin else None
    wanted = max(args.max_conns if "maxconn" in (args.workloads or []) else 0, args.idle_conns)
    sub_workers = args.workers or max(2, -(-wanted // 9000))
    loadgen = LoadGen(sub_workers + 1, load_cpus)
    ctx = workloads.Context(
        loadgen=loadgen,
        sub_workers=list(range(sub_workers)),
        pub_worker=sub_workers,
        server_cpus=server_cpus,
        log_dir=args.out / "logs",
    )
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:] if argv is None else argv,
        "cpus": ncpu,
        "pinned": {"server": server_cpus, "load": load_cpus},
        "load_workers": sub_workers + 1,
        "python": platform.python_version(),
        "node": version(["node", "--version"]),
        "plexus": version([*servers.plexus_command(), "--version"]),
        "git": version(["git", "-C", str(servers.REPO), "rev-parse", "--short", "HEAD"]),
    }
    results: list[dict[str, Any]] = []
    try:
        for group, kind, fn in runs:
            try:
                result = fn(ctx, kind)
            except Exception as exc:  # one failed run must not lose the others
                print(f"\n  ! {group} {kind}: {type(exc).__name__}: {exc}", file=sys.stderr)
                result = {"workload": group.split()[0], "server": kind, "error": str(exc)}
            result["group"] = group
            results.append(result)
    except KeyboardInterrupt:
        print("\ninterrupted: reporting what finished", file=sys.stderr)
    finally:
        loadgen.close()
    print(report.table(results))
    path = report.write_json(results, meta, args.out)
    print(f"\nresults: {path}")
    if args.plot:
        from bench import plot

        png = plot.plot(path)
        if png is not None:
            print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
