"""The CI memory-regression gate: approved peak RSS per model against a committed baseline.

A peak above the budget share, or above the baseline by more than the tolerance, fails. A peak that
dropped is reported so the baseline can be lowered deliberately; it is never rewritten automatically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from serve.artifacts import ArtifactError, load_approved

DEFAULT_TOLERANCE = 0.10


@dataclass(frozen=True)
class BaselineCheck:
    failures: list[str]
    notes: list[str]


def check_baseline(
    artifacts_root: Path, baseline_path: Path, models: list[str], tolerance: float = DEFAULT_TOLERANCE
) -> BaselineCheck:
    baseline = json.loads(baseline_path.read_text(encoding="utf-8"))
    failures, notes = [], []
    for model in models:
        try:
            manifest = load_approved(artifacts_root / model).manifest
        except ArtifactError as exc:
            failures.append(f"{model}: no verified approval ({exc})")
            continue
        peak = float(manifest["metrics"]["peak_rss_mb"])
        share = float(manifest["budget_share_mb"])
        if peak > share:
            failures.append(f"{model}: peak RSS {peak:.1f} MB exceeds its budget share {share:.0f} MB")
        if model not in baseline:
            failures.append(f"{model}: no entry in {baseline_path}; add one deliberately")
            continue
        reference = float(baseline[model]["peak_rss_mb"])
        change = (peak - reference) / reference
        line = f"{model}: peak RSS {peak:.1f} MB vs baseline {reference:.1f} MB ({change:+.1%})"
        if change > tolerance:
            failures.append(f"{line}: more than +{tolerance:.0%}")
        elif change < -tolerance:
            notes.append(f"{line}: dropped; lower the baseline in {baseline_path} deliberately")
        else:
            notes.append(line)
    return BaselineCheck(failures, notes)
