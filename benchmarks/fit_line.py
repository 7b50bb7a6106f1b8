"""How well the service fit's line meets the peaks it was fitted to, refitted on recorded fits: every
`service_fit` (or service-fit.json) under the given folder, fitted again with the landed `line` and
`Savings`, against the `line_error` each file recorded when it was measured. Reads files; measures nothing.

Usage: python -m benchmarks.fit_line [FOLDER]   (default benchmarks/results)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.memory.service_fit import Activations, Savings, counted_peak, line, on_line


def undisturbed_runs(path: Path) -> list[dict[str, Any]]:
    """The runs of the fit `path` holds that no kill disturbed; empty when it holds no fit with figures."""
    data = json.loads(path.read_text())
    fit = data.get("service_fit", data) if isinstance(data, dict) else None
    runs = [r for r in (fit or {}).get("runs") or [] if "worker_vmhwm_mb" in r and "line_error" in r]
    return [r for r in runs if not r["workers_replaced"] and not (r["cgroup"] or {}).get("oom_kills")]


def refit(runs: list[dict[str, Any]]) -> list[float]:
    """Each run's error (line ÷ counted peak − 1) of the line through them, with measured savings. The
    curve's slope only reaches below the fewest measured tokens, which a recorded run never is."""
    savings = Savings.of(runs, Activations(((runs[0]["tokens_per_run"], 0.0),), 1))
    base, per_worker = line(runs, savings)
    return [on_line(r, base, per_worker, savings) / counted_peak(r) - 1 for r in runs]


def main(argv: list[str]) -> None:
    folder = Path(argv[0] if argv else "benchmarks/results")
    worst_recorded = worst_refitted = 0.0
    for path in sorted(folder.glob("*.json")):
        runs = undisturbed_runs(path)
        if len(runs) < 2:
            continue
        recorded, refitted = [r["line_error"] for r in runs], refit(runs)
        worst_recorded = max(worst_recorded, *map(abs, recorded))
        worst_refitted = max(worst_refitted, *map(abs, refitted))
        shapes = " ".join(f"{r['workers']}@{r['tokens_per_run']}" for r in runs)
        print(
            f"{path.name:<56} {shapes:<44} recorded {min(recorded):+.1%}..{max(recorded):+.1%}  "
            f"measured savings {min(refitted):+.1%}..{max(refitted):+.1%}"
        )
    print(f"largest error: recorded {worst_recorded:.1%}, measured savings {worst_refitted:.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
