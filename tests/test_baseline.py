"""The memory-regression gate fails when it should: a peak 11% over the baseline, another variant, a
service over its budget or grown, an entry missing; and passes on the figures it was given."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline.memory.baseline import check_baseline
from serve.artifacts import load_approved
from tests.conftest import TinyRun

MODELS = ["tiny-embed", "tiny-clf"]


def baseline_of(artifacts: Path) -> dict[str, Any]:
    """A baseline holding exactly the figures of `artifacts`."""
    models = {}
    for model in MODELS:
        manifest = load_approved(artifacts / model).manifest
        models[model] = {"variant": manifest["variant"]["name"], "peak_rss_mb": manifest["metrics"]["peak_rss_mb"]}
    fit = json.loads((artifacts / "service-fit.json").read_text())
    return {"models": models, "services": {"service": {"total_mb": fit["total_mb"]}}}


def run_check(artifacts: Path, baseline: dict[str, Any], tmp_path: Path) -> tuple[list[str], list[str]]:
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline))
    result = check_baseline(artifacts, path, MODELS, "service")
    return result.failures, result.notes


@pytest.fixture
def artifacts(tiny_run: TinyRun, tmp_path: Path) -> Path:
    copy = tmp_path / "artifacts"
    shutil.copytree(tiny_run.artifacts, copy)
    return copy


def test_the_figures_it_was_given_pass(artifacts: Path, tmp_path: Path) -> None:
    failures, notes = run_check(artifacts, baseline_of(artifacts), tmp_path)
    assert failures == [] and len(notes) == 3


def test_a_peak_11_percent_over_fails(artifacts: Path, tmp_path: Path) -> None:
    baseline = baseline_of(artifacts)
    baseline["models"]["tiny-embed"]["peak_rss_mb"] /= 1.11
    failures, _ = run_check(artifacts, baseline, tmp_path)
    assert len(failures) == 1 and failures[0].startswith("tiny-embed: peak RSS") and "(+11.0%)" in failures[0]


def test_another_variant_fails(artifacts: Path, tmp_path: Path) -> None:
    baseline = baseline_of(artifacts)
    # Random tiny weights: which variant the run approved (fp32 among them) depends on its timings.
    other = "int8-qint8-per-channel" if baseline["models"]["tiny-clf"]["variant"] == "fp32" else "fp32"
    baseline["models"]["tiny-clf"]["variant"] = other
    failures, _ = run_check(artifacts, baseline, tmp_path)
    assert len(failures) == 1 and failures[0].startswith("tiny-clf: approved ") and f"variant is {other}" in failures[0]


def test_a_service_over_budget_or_grown_fails(artifacts: Path, tmp_path: Path) -> None:
    baseline = baseline_of(artifacts)
    fit = json.loads((artifacts / "service-fit.json").read_text())
    (artifacts / "service-fit.json").write_text(json.dumps({**fit, "total_mb": fit["budget_mb"] + 1, "fits": False}))
    failures, _ = run_check(artifacts, baseline, tmp_path)
    assert failures[0] == f"service service: one worker peaks at {fit['budget_mb'] + 1:.1f} MB, over the 512 MB budget"
    assert failures[1].startswith("service service: one worker") and "more than +10%" in failures[1]


def test_a_missing_entry_or_fit_fails(artifacts: Path, tmp_path: Path) -> None:
    baseline = baseline_of(artifacts)
    del baseline["models"]["tiny-embed"]
    (artifacts / "service-fit.json").unlink()
    failures, _ = run_check(artifacts, baseline, tmp_path)
    assert failures[0].startswith("tiny-embed: no entry in ")
    assert failures[1].startswith("service service: no whole-service fit measured")
