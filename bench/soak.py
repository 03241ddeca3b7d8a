"""`python -m bench soak`: a server that must not grow, leak or fail under churn and attacks.

Starts one `plexus serve` with its built-in settings (the anonymous `chat`
demo, every rate limit on, the SQLite engine unless `--engine memory`) and
drives it through rounds of `bench/soak_load.py`: hundreds of clients that
join, publish and drop (half without a close frame), tens of thousands of
one-off channels published, subscribed and left, or read, and the attacks of
issue 10, while one bystander per room checks that it receives every message
in order. After each round it reads the server's RSS, open files and
`/health` state. Then it checks the goals:

* RSS flat after warm-up: every later round within 10% of the round that
  ended the warm-up;
* at most 64 bytes kept per one-off channel: the least-squares slope of RSS
  over the one-off channels used since the warm-up (all growth is blamed on
  them, so this is an upper bound);
* the server's `/health` state (node and engine entries, asyncio tasks) the
  same after every round as after the warm-up; at the end, with every client
  gone, no subscription left anywhere and as many tasks and open files as
  before the first client;
* every bystander complete, every attack answered as documented, and no
  `Traceback` in the server's log.

Prints a table and the goals, writes `bench/results/soak-<time>.json`, exits
1 if a goal failed. Talks to 127.0.0.0/8 only; `--quick` takes well under a
minute, the full run a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import servers
from bench.soak_load import FULL, QUICK, Plan, RoundResult, Snapshot, Soak, rss_bytes

RSS_FLAT = 0.10  # RSS after warm-up stays within 10% of the warm-up's
BYTES_PER_CHANNEL = 64.0
REQUEST_TIMEOUT = 2.0  # the server's http_request_timeout and keep-alive in the soak
# Entries that count subscriptions: none may be left once every client is gone.
SUBSCRIPTION_ENTRIES = ("subscribed", "pinned", "presence_channels")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes, well under a minute")
    p.add_argument("--engine", choices=("sqlite", "memory"), default="sqlite")
    p.add_argument("--rounds", type=int, help="rounds (default 12, quick 5)")
    p.add_argument("--clients", type=int, help="churn clients per round (default 300, quick 100)")
    p.add_argument(
        "--published", type=int, help="one-off channels published per round (10000, quick 4000)"
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin server and load to CPUs")
    p.add_argument("--out", type=Path, default=servers.BENCH_DIR / "results")
    return p.parse_args(argv)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def comparable(snapshot: Snapshot) -> dict[str, Any]:
    """The parts of a state that must not change from round to round."""
    state = snapshot.state
    return {"tasks": state["tasks"], "node": state["node"], "engine": state["engine"]}


async def drive(server: servers.Server, plan: Plan) -> dict[str, Any]:
    """Run the rounds against `server`; return every figure the report needs."""
    soak = Soak(
        f"http://127.0.0.1:{server.port}", server.pid, plan, request_timeout=REQUEST_TIMEOUT
    )
    baseline = await soak.health()
    started = await soak.start()
    rows: list[dict[str, Any]] = []
    snapshots: list[Snapshot] = []
    oneoffs = 0
    try:
        for number in range(1, plan.rounds + 1):
            cpu = server.cpu_seconds()
            result: RoundResult = await soak.round(number)
            cpu = server.cpu_seconds() - cpu
            if not server.alive():
                raise RuntimeError(f"the server exited:\n{server.log_tail()}")
            oneoffs += result.oneoffs
            assert result.snapshot is not None
            snapshots.append(result.snapshot)
            state = result.snapshot.state
            row = {
                "round": number,
                "seconds": round(result.seconds, 2),
                "server_cpu": round(cpu, 2),
                "clients": result.clients,
                "cut": result.cut,
                "messages": result.messages,
                "oneoffs": oneoffs,
                "rss": rss_bytes(server.pid),
                "fds": result.snapshot.fds,
                "tasks": state["tasks"],
                "node": state["node"],
                "engine": state["engine"],
                "attacks": dict(result.attacks),
                "errors": result.errors,
            }
            rows.append(row)
            print(
                f"  round {number:>2}: {row['seconds']:5.1f} s ({cpu:.1f} server CPU s),"
                f" {result.clients} clients"
                f" ({result.cut} cut), {result.messages} messages, {oneoffs:,} one-offs,"
                f" RSS {row['rss'] / 2**20:6.1f} MiB, {row['fds']} fds, {row['tasks']} tasks"
                + (f", {len(result.errors)} errors" if result.errors else ""),
                file=sys.stderr,
            )
    finally:
        ended = await soak.close()
    return {
        "baseline": baseline["state"],
        "started": dataclasses.asdict(started),
        "ended": dataclasses.asdict(ended),
        "baseline_fds": soak.baseline_fds,
        "rows": rows,
        "reference": comparable(snapshots[plan.warmup - 1])
        if len(snapshots) >= plan.warmup
        else {},
        "drift": [
            {"round": n, "state": comparable(s)}
            for n, s in enumerate(snapshots, 1)
            if n > plan.warmup and comparable(s) != comparable(snapshots[plan.warmup - 1])
        ],
        "bystanders": [
            {"room": b.room, "received": b.received, "last": b.last, "join_leave": b.presence}
            for b in soak.bystanders
        ],
        "errors": soak.errors,
    }


def goals(
    figures: dict[str, Any], plan: Plan, log: str, *, quick: bool = False
) -> list[tuple[str, bool, str]]:
    """(goal, met, measured) for each goal of the soak.

    `quick`: the bytes per one-off channel are shown but not held to the goal.
    Over a few rounds the allocator is still reaching the high-water mark of
    what a round holds at once (RSS climbs for ~10 rounds, then stays flat),
    which the slope blames on the channels; the full run measures it.
    """
    rows = figures["rows"]
    after = rows[plan.warmup - 1 :]  # the warm-up's last round, then the measured ones
    ref = after[0]["rss"] if after else 0
    spread = max((abs(r["rss"] - ref) / ref for r in after), default=0.0) if ref else 0.0
    per_channel = slope([r["oneoffs"] for r in after], [r["rss"] for r in after])
    ended = figures["ended"]
    end_state = ended["state"]
    held = {k: end_state["engine"].get(k, 0) for k in SUBSCRIPTION_ENTRIES}
    node_left = {k: v for k, v in end_state["node"].items() if v}
    attacks: dict[str, int] = {}
    for row in rows:
        for outcome, count in row["attacks"].items():
            attacks[outcome] = attacks.get(outcome, 0) + count
    return [
        (
            f"RSS flat after warm-up (within {RSS_FLAT:.0%})",
            spread <= RSS_FLAT,
            f"{spread:.1%} at most (reference {ref / 2**20:.1f} MiB after round {plan.warmup})",
        ),
        (
            f"<= {BYTES_PER_CHANNEL:.0f} bytes kept per one-off channel",
            quick or per_channel <= BYTES_PER_CHANNEL,
            f"{per_channel:.1f} bytes (RSS slope over"
            f" {after[-1]['oneoffs'] - after[0]['oneoffs'] if after else 0:,} one-off channels)"
            + (" (--quick: shown, not held to the goal)" if quick else ""),
        ),
        (
            "state the same after every round",
            not figures["drift"],
            "same"
            if not figures["drift"]
            else f"changed in rounds {[d['round'] for d in figures['drift']]}",
        ),
        (
            "no socket left behind",
            ended["settled"] and ended["fds"] == figures["baseline_fds"],
            f"{ended['fds']} open files at the end,"
            f" {figures['baseline_fds']} before the first client",
        ),
        (
            "no task left behind",
            end_state["tasks"] == figures["baseline"]["tasks"],
            f"{end_state['tasks']} tasks at the end, {figures['baseline']['tasks']} before",
        ),
        (
            "no subscription or connection state left",
            not any(held.values()) and not node_left,
            f"engine {held}, node {node_left or 'empty'}",
        ),
        (
            "bystanders complete and in order, attacks answered as documented",
            not figures["errors"],
            f"{len(figures['errors'])} errors"
            + (f", first: {figures['errors'][0]}" if figures["errors"] else "")
            + f"; attacks: {attacks}",
        ),
        (
            "no traceback in the server log",
            "Traceback" not in log,
            f"{log.count('Traceback')} tracebacks",
        ),
    ]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    overrides = {
        name: getattr(args, name)
        for name in ("rounds", "clients", "published")
        if getattr(args, name) is not None
    }
    plan = dataclasses.replace(plan, **overrides)
    if plan.rounds <= plan.warmup:
        print(f"--rounds must be more than the {plan.warmup} warm-up rounds", file=sys.stderr)
        return 2
    ncpu = os.cpu_count() or 1
    pin = not args.no_pin and ncpu >= 2
    env = {
        "PLEXUS_ENGINE": args.engine,
        "PLEXUS_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
        "PLEXUS_HTTP_KEEPALIVE_TIMEOUT": str(REQUEST_TIMEOUT),
        "PLEXUS_MAX_BODY_SIZE": str(plan.max_body_size),
    }
    server = servers.start("plexus-default", args.out / "logs", [0] if pin else None, env)
    if pin:
        os.sched_setaffinity(0, list(range(1, ncpu)))
    print(
        f"soak: {args.engine} engine, {plan.rounds} rounds ({plan.warmup} warm-up),"
        f" {plan.clients} clients and {plan.oneoffs:,} one-off channels per round;"
        f" log {server.log}",
        file=sys.stderr,
    )
    started = time.monotonic()
    try:
        try:
            import uvloop

            figures = uvloop.run(drive(server, plan))
        except ImportError:
            figures = asyncio.run(drive(server, plan))
    finally:
        server.stop()
    log = server.log.read_text(errors="replace")
    results = goals(figures, plan, log, quick=args.quick)
    print(f"\nsoak: {args.engine} engine, {time.monotonic() - started:.0f} s")
    print(
        f"{'round':>5} {'s':>5} {'cpu s':>5} {'one-offs':>9} {'RSS MiB':>8} {'fds':>4}"
        f" {'tasks':>5}  engine"
    )
    for row in figures["rows"]:
        engine = " ".join(f"{k}={v}" for k, v in row["engine"].items() if v)
        print(
            f"{row['round']:>5} {row['seconds']:>5.1f} {row['server_cpu']:>5.1f}"
            f" {row['oneoffs']:>9,} {row['rss'] / 2**20:>8.1f} {row['fds']:>4}"
            f" {row['tasks']:>5}  {engine}"
        )
    print()
    for goal, met, measured in results:
        print(f"  {'PASS' if met else 'FAIL'}  {goal}: {measured}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / time.strftime("soak-%Y%m%d-%H%M%S.json")
    path.write_text(
        json.dumps(
            {
                "plan": dataclasses.asdict(plan),
                "engine": args.engine,
                "goals": [{"goal": g, "met": m, "measured": x} for g, m, x in results],
                **figures,
            },
            indent=1,
            default=str,
        )
    )
    print(f"\nresults: {path}")
    return 0 if all(met for _, met, _ in results) else 1
