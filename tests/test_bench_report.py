"""`make bench` output: medians and ranges come from the rounds, ratios are against memfit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.report import SUMMARY, write_results


def rounds(scale: float) -> list[dict[str, float]]:
    base = {key: 10.0 for key in SUMMARY}
    return [{key: value * scale * factor for key, value in base.items()} for factor in (1.0, 1.2, 0.9)]


def results() -> dict:
    quality = {"probe_accuracy": 0.80, "cosine_mean": 1.0, "cosine_min": 1.0, "overlap_at_10": 1.0}
    contenders = {
        "torch-fp32": {"label": "torch", "rounds": rounds(4.0), "quality": quality},
        "memfit": {"label": "memfit", "rounds": rounds(1.0), "quality": {**quality, "probe_accuracy": 0.79}},
    }
    return {
        "created_at": "2026-11-27T00:00:00+00:00",
        "minutes": 1.0,
        "machine": {"cpus": 2, "platform": "linux", "cpu": "test"},
        "versions": {"python": "3.11"},
        "budget_mb": 512,
        "rounds": 3,
        "models": [
            {
                "model": "minilm",
                "max_seq_len": 128,
                "memfit_variant": "v",
                "contenders": contenders,
                "physical_floor": {"runtime_imports_mb": 50, "weights_mb": 20, "gunicorn_master_mb": 30, "floor_mb": 5},
            }
        ],
    }


def test_summary_ratios_table_and_plot(tmp_path: Path) -> None:
    paths = write_results(results(), tmp_path)
    assert [p.name for p in paths] == ["2026-11-27.json", "2026-11-27.md", "2026-11-27.png"]
    model = json.loads(paths[0].read_text())["models"][0]
    peak = model["summary"]["torch-fp32"]["peak_total_rss_mb"]
    assert (peak["median"], peak["min"], peak["max"]) == (40.0, 36.0, 48.0)
    ratios = model["ratios"]["torch-fp32"]
    assert ratios["memory_x"] == 4.0 and ratios["single_latency_x"] == 4.0
    assert ratios["throughput_x"] == 0.25  # 4x the requests/s in these made-up rounds
    assert ratios["accuracy_delta_pt"] == pytest.approx(1.0)
    assert model["ratios"]["memfit"]["memory_x"] == 1.0
    table = paths[1].read_text()
    assert "**25% of the torch-fp32 service** (10 vs 40 MB)" in table
    assert "**2.00× the physical floor** of 5 MB" in table
    assert "| torch-fp32: torch | 40 (36–48) |" in table
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
