"""The results table (with ratios between servers) and the JSON results file."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Result = dict[str, Any]


# workload -> [(metric key, label, format)]. Labels say which way is better.
METRICS: dict[str, list[tuple[str, str, str]]] = {
    "fanout": [
        ("cpu_s_per_1m", "server CPU s / 1M deliveries (lower better)", "{:.2f}"),
        ("deliveries_per_s", "deliveries/s (higher better)", "{:,.0f}"),
        ("wall_s", "wall s", "{:.2f}"),
        ("server_cpu_util", "server CPU utilisation", "{:.2f}"),
        ("server_sys_frac", "kernel share of server CPU", "{:.2f}"),
        ("client_cpu_util", "load client CPU utilisation", "{:.2f}"),
        ("others_cpu_util", "other CPU use (softirq, noise)", "{:.2f}"),
        ("server_rss_mb", "server RSS MB", "{:.1f}"),
    ],
    "steady": [
        ("cpu_s_per_1m", "server CPU s / 1M deliveries (lower better)", "{:.2f}"),
        ("p50_ms", "latency p50 ms", "{:.2f}"),
        ("p99_ms", "latency p99 ms", "{:.2f}"),
        ("max_ms", "latency max ms", "{:.2f}"),
        ("server_cpu_util", "server CPU utilisation", "{:.2f}"),
        ("client_cpu_util", "load client CPU utilisation", "{:.2f}"),
        ("others_cpu_util", "other CPU use (softirq, noise)", "{:.2f}"),
    ],
    "roundtrip": [
        ("cpu_us_per_op", "server CPU µs / round trip (lower better)", "{:.1f}"),
        ("ops_per_s", "round trips/s (higher better)", "{:,.0f}"),
        ("p50_ms", "RTT p50 ms", "{:.3f}"),
        ("p99_ms", "RTT p99 ms", "{:.3f}"),
        ("server_cpu_util", "server CPU utilisation", "{:.2f}"),
        ("client_cpu_util", "load client CPU utilisation", "{:.2f}"),
        ("others_cpu_util", "other CPU use (softirq, noise)", "{:.2f}"),
    ],
    "idle": [
        ("kb_per_conn", "server RSS KB / idle connection (lower better)", "{:.1f}"),
        ("rss_mb", "server RSS MB", "{:.1f}"),
        ("connects_per_s", "connects/s", "{:,.0f}"),
        ("idle_cpu_util", "idle CPU utilisation", "{:.3f}"),
    ],
    "history": [
        ("deliveries_per_s", "deliveries/s (higher better)", "{:,.0f}"),
        ("publishes_per_s", "publishes/s", "{:,.0f}"),
        ("cpu_s_per_1m", "server CPU s / 1M deliveries (lower better)", "{:.2f}"),
    ],
}
METRICS["scaleout"] = [
    ("cpu_s_per_1m", "delivering node CPU s / 1M deliveries (lower better)", "{:.2f}"),
    ("deliveries_per_s", "deliveries/s (higher better)", "{:,.0f}"),
    ("publishes_per_s", "publishes/s", "{:,.0f}"),
    ("server_cpu_util", "delivering node CPU utilisation", "{:.2f}"),
    ("others_cpu_util", "other CPU use (publishing node, redis, softirq)", "{:.2f}"),
]
METRICS["durable"] = METRICS["roundtrip"][:4]
METRICS["compression"] = [
    ("cpu_s_per_1m", "server CPU s / 1M deliveries (lower better)", "{:.2f}"),
    ("wire_bytes_per_delivery", "bytes on the wire / delivery (lower better)", "{:.1f}"),
    ("deliveries_per_s", "deliveries/s (higher better)", "{:,.0f}"),
    ("server_rss_mb", "server RSS MB", "{:.1f}"),
    ("server_sys_frac", "kernel share of server CPU", "{:.2f}"),
    ("client_cpu_util", "load client CPU utilisation", "{:.2f}"),
    ("others_cpu_util", "other CPU use (softirq, noise)", "{:.2f}"),
]
METRICS["maxconn"] = [
    ("held", "connections held (higher better)", "{:,.0f}"),
    ("still_serving", "accepts one more after", "{}"),
    *METRICS["idle"][:3],
]

# "Other CPU use" (cores) above which a run is flagged: another program was busy.
NOISY = 0.5

# Which server is compared against which: (numerator, denominator).
PAIRS = (
    ("plexus", "node"),
    ("floor", "node"),
    ("plexus-sqlite", "plexus"),
    ("plexus-redis", "plexus"),
    ("plexus-asgi", "plexus"),
    ("plexus-deflate", "plexus"),
    ("node-deflate", "node"),
    ("plexus-deflate", "node-deflate"),
)


def _fmt(fmt: str, value: Any) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def median(runs: list[Result]) -> Result:
    """One result whose numeric metrics are the medians over `runs` (failed runs left out)."""
    ok = [r for r in runs if "error" not in r] or runs
    merged = dict(ok[0])
    for key, value in ok[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values = [r[key] for r in ok if isinstance(r.get(key), int | float)]
            merged[key] = statistics.median(values)
    merged["complete"] = all(r.get("complete", True) for r in runs)
    return merged


def _ratio(a: Any, b: Any) -> str:
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b))
    if not numbers or b == 0:
        return f"{'-':>22}"
    return f"{a / b:>22.2f}"


def table(results: Iterable[Result]) -> str:
    """Render all results as text: one block per workload and size, ratios on the right."""
    runs: dict[str, dict[str, list[Result]]] = {}
    for r in results:
        group = str(r.get("group", r["workload"]))
        runs.setdefault(group, {}).setdefault(r["server"], []).append(r)
    lines: list[str] = []
    for group, by_server_runs in runs.items():
        by_server = {server: median(rs) for server, rs in by_server_runs.items()}
        repeats = max(len(rs) for rs in by_server_runs.values())
        if repeats > 1:
            group += f"  (median of {repeats} runs)"
        first = next(iter(by_server.values()))
        known = (
            "plexus",
            "plexus-sqlite",
            "plexus-redis",
            "plexus-asgi",
            "plexus-deflate",
            "node",
            "node-deflate",
            "floor",
        )
        servers = [s for s in known if s in by_server]
        pairs = [p for p in PAIRS if p[0] in by_server and p[1] in by_server]
        head = f"{'':48}" + "".join(f"{s:>16}" for s in servers)
        head += "".join(f"{a + '/' + b:>22}" for a, b in pairs)
        lines += ["", group, head]
        for s in servers:
            if "error" in by_server[s]:
                lines.append(f"  {s}: FAILED: {by_server[s]['error']}")
        for key, label, fmt in METRICS.get(first["workload"], []):
            row = f"  {label:46}"
            row += "".join(f"{_fmt(fmt, by_server[s].get(key)):>16}" for s in servers)
            for a, b in pairs:
                row += _ratio(by_server[a].get(key), by_server[b].get(key))
            lines.append(row)
        noisy = [s for s in servers if by_server[s].get("others_cpu_util", 0) > NOISY]
        if noisy:
            lines.append(
                f"  ! busy machine during {', '.join(noisy)}: trust CPU per unit of work"
                " more than wall-clock and latency figures"
            )
        for s in servers:
            if by_server[s].get("complete") is False:
                lines.append(f"  ! {s}: incomplete: closes {by_server[s].get('closes')}")
    return "\n".join(lines)


def write_json(results: list[Result], meta: dict[str, Any], out_dir: Path) -> Path:
    """Write `{"meta", "results"}` to out_dir/bench-<time>.json and return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / time.strftime("bench-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    return path
