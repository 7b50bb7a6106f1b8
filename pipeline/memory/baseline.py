"""The CI memory-regression gate: each approval and the whole service against a committed baseline.

Per model: the peak above its budget share, or above the baseline by more than the tolerance, fails, and
so does an approval of another variant than the baseline's (a different kind of model is not a memory
figure to compare). Per service: the whole-service fit over the budget, missing, or above the
baseline's by more than the tolerance, fails. A figure that dropped is reported so the baseline can be
lowered deliberately; it is never rewritten automatically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.artifacts import ArtifactError, load_approved, read_json
from serve.planner import SERVICE_FIT_FILE

DEFAULT_TOLERANCE = 0.10


@dataclass
class BaselineCheck:
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def compare(self, subject: str, value: float, reference: float, tolerance: float, where: Path) -> None:
        change = (value - reference) / reference
        line = f"{subject} {value:.1f} MB vs baseline {reference:.1f} MB ({change:+.1%})"
        if change > tolerance:
            self.failures.append(f"{line}: more than +{tolerance:.0%}")
        elif change < -tolerance:
            self.notes.append(f"{line}: dropped; lower the baseline in {where} deliberately")
        else:
            self.notes.append(line)


def check_baseline(
    artifacts_root: Path,
    baseline_path: Path,
    models: list[str],
    service: str,
    tolerance: float = DEFAULT_TOLERANCE,
) -> BaselineCheck:
    baseline = json.loads(baseline_path.read_text(encoding="utf-8"))
    check = BaselineCheck()
    for model in models:
        try:
            manifest = load_approved(artifacts_root / model).manifest
        except ArtifactError as exc:
            check.failures.append(f"{model}: no verified approval ({exc})")
            continue
        check_model(check, model, manifest, baseline.get("models", {}).get(model), tolerance, baseline_path)
    check_service(check, artifacts_root, baseline.get("services", {}).get(service), service, tolerance, baseline_path)
    return check


def check_model(
    check: BaselineCheck,
    model: str,
    manifest: dict[str, Any],
    entry: dict[str, Any] | None,
    tolerance: float,
    where: Path,
) -> None:
    peak = float(manifest["metrics"]["peak_rss_mb"])
    share = float(manifest["budget_share_mb"])
    if peak > share:
        check.failures.append(f"{model}: peak RSS {peak:.1f} MB exceeds its budget share {share:.0f} MB")
    if entry is None:
        check.failures.append(f"{model}: no entry in {where}; add one deliberately")
        return
    variant = manifest["variant"]["name"]
    if variant != entry["variant"]:
        check.failures.append(
            f"{model}: approved {variant}, the baseline's variant is {entry['variant']} "
            "(see the report's ranking for why)"
        )
    check.compare(f"{model}: peak RSS", peak, float(entry["peak_rss_mb"]), tolerance, where)


def check_service(
    check: BaselineCheck,
    artifacts_root: Path,
    entry: dict[str, Any] | None,
    service: str,
    tolerance: float,
    where: Path,
) -> None:
    try:
        fit = read_json(artifacts_root / SERVICE_FIT_FILE)
    except ArtifactError as exc:
        check.failures.append(f"service {service}: no whole-service fit measured ({exc})")
        return
    total, budget = float(fit["total_mb"]), float(fit["budget_mb"])
    if not fit["fits"] or total > budget:
        check.failures.append(f"service {service}: one worker peaks at {total:.1f} MB, over the {budget:.0f} MB budget")
    if entry is None:
        check.failures.append(f"service {service}: no entry in {where}; add one deliberately")
        return
    check.compare(f"service {service}: one worker", total, float(entry["total_mb"]), tolerance, where)
