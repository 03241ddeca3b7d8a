"""Plot p99 (and p50) fan-out latency against subscriber count from a results file.

    python -m bench steady --steady-subs 250,1000,2500,5000 --plot
    python -m bench.plot bench/results/bench-....json    # re-plot an earlier run

Needs matplotlib (optional: without it, nothing is drawn and a note is printed).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def plot(results_file: Path, out: Path | None = None) -> Path | None:
    """Write `<results>.png` beside the results file; return its path (None if nothing to draw)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return None
    data: dict[str, Any] = json.loads(results_file.read_text())
    runs: dict[tuple[str, int], list[Any]] = {}
    for r in data["results"]:
        if r.get("workload") == "steady" and "p99_ms" in r:
            runs.setdefault((r["server"], r["subs"]), []).append(r)
    series: dict[str, list[tuple[int, float, float]]] = {}
    for (server, subs), rs in runs.items():  # medians over repeated runs
        p50 = statistics.median(r["p50_ms"] for r in rs)
        p99 = statistics.median(r["p99_ms"] for r in rs)
        series.setdefault(server, []).append((subs, p50, p99))
    if not series:
        print("plot: no steady results in this file", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colours = {
        "plexus": "tab:blue",
        "node": "tab:orange",
        "plexus-sqlite": "tab:green",
        "floor": "tab:gray",
    }
    rate = next(r["rate"] for r in data["results"] if r.get("workload") == "steady")
    for server, points in sorted(series.items()):
        points.sort()
        counts = [p[0] for p in points]
        colour = colours.get(server)
        p50s, p99s = [p[1] for p in points], [p[2] for p in points]
        ax.plot(counts, p99s, "o-", color=colour, label=f"{server} p99")
        ax.plot(counts, p50s, "o--", color=colour, alpha=0.5, label=f"{server} p50")
    ax.set_xlabel("subscribers on the channel")
    ax.set_ylabel("publish → receive latency (ms)")
    ax.set_yscale("log")
    repeats = max(len(rs) for rs in runs.values())
    note = f", median of {repeats} runs" if repeats > 1 else ""
    ax.set_title(f"Fan-out latency at {rate:g} messages/s{note}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    target = out or results_file.with_suffix(".png")
    fig.savefig(target)
    plt.close(fig)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m bench.plot RESULTS.json", file=sys.stderr)
        sys.exit(2)
    made = plot(Path(sys.argv[1]))
    if made is not None:
        print(made)
