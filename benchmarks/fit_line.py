"""How well the service fit's lines meet the peaks they were fitted to, refitted on recorded fits: every
`service_fit` (or service-fit.json) under the given folder, fitted again with the landed `line` and
`Savings`, against the `line_error` each file recorded when it was measured; and the line through the
cgroup peaks alone, against them. Reads files; measures nothing.

Usage: python -m benchmarks.fit_line [FOLDER]   (default benchmarks/results)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.memory.service_fit import Activations, Savings, line, on_line
from serve.planner import container_peak, counted_peak


def undisturbed_runs(path: Path) -> list[dict[str, Any]]:
    """The runs of the fit `path` holds that no kill disturbed; empty when it holds no fit with figures."""
    data = json.loads(path.read_text())
    fit = data.get("service_fit", data) if isinstance(data, dict) else None
    runs = [r for r in (fit or {}).get("runs") or [] if "worker_vmhwm_mb" in r and "line_error" in r]
    return [r for r in runs if not r["workers_replaced"] and not (r["cgroup"] or {}).get("oom_kills")]


def refit(runs: list[dict[str, Any]], peak: Callable[[dict[str, Any]], float] = counted_peak) -> list[float]:
    """Each run's error (line ÷ peak − 1) of the line through their `peak`s, with measured savings. The
    curve's slope only reaches below the fewest measured tokens, which a recorded run never is."""
    savings = Savings.of(runs, Activations(((runs[0]["tokens_per_run"], 0.0),), 1))
    base, per_worker = line(runs, savings, peak)
    return [on_line(r, base, per_worker, savings) / peak(r) - 1 for r in runs]


def span(errors: list[float]) -> str:
    return f"{min(errors):+.1%}..{max(errors):+.1%}" if errors else "-"


def main(argv: list[str]) -> None:
    folder = Path(argv[0] if argv else "benchmarks/results")
    worst_recorded = worst_refitted = worst_cgroup = 0.0
    for path in sorted(folder.glob("*.json")):
        runs = undisturbed_runs(path)
        if len(runs) < 2:
            continue
        recorded, refitted = [r["line_error"] for r in runs], refit(runs)
        grouped = [r for r in runs if r["cgroup"]]
        cgroup = refit(grouped, container_peak) if len(grouped) > 1 else []
        worst_recorded = max(worst_recorded, *map(abs, recorded))
        worst_refitted = max(worst_refitted, *map(abs, refitted))
        worst_cgroup = max(worst_cgroup, *map(abs, cgroup or [0.0]))
        shapes = " ".join(f"{r['workers']}@{r['tokens_per_run']}" for r in runs)
        print(
            f"{path.name:<56} {shapes:<44} recorded {span(recorded)}  measured savings {span(refitted)}  "
            f"cgroup line {span(cgroup)}"
        )
    print(
        f"largest error: recorded {worst_recorded:.1%}, measured savings {worst_refitted:.1%}, "
        f"cgroup line {worst_cgroup:.1%}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
