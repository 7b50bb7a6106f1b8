"""The report explains an approval's fidelity price: which candidates stay closer to fp32, and why each
was not chosen."""

from __future__ import annotations

from typing import Any

from pipeline.report import closer_lines


def row(variant: str, cosine: float, overlap: float, verdict: str, reason: str, p50: float) -> dict[str, Any]:
    return {
        "variant": variant,
        "cosine_mean": cosine,
        "overlap_at_10": overlap,
        "agreement": None,
        "p50_ms": p50,
        "worst_case_peak_mb": 300.0,
        "verdict": verdict,
        "reason": reason,
    }


def test_closer_candidates_are_listed_with_why_they_lost() -> None:
    model = {
        "objective": "lowest_latency",
        "candidates": [
            row("fp32", 1.0, 1.0, "rejected", "peak RSS 598 MB > share 370 MB at 1x128 tokens", 28.0),
            row("int8", 0.86, 0.50, "rejected", "mean cosine 0.8600 < 0.995", 9.4),
            row("wo8", 0.9999, 0.980, "passed", "passes every gate; not best by objective", 102.7),
            row("wo8-int8-compute", 0.9998, 0.967, "approved", "passes every gate; best by objective", 23.4),
            row("higher-cosine-lower-overlap", 0.99985, 0.95, "passed", "passes every gate", 20.0),
        ],
    }
    text = "\n".join(closer_lines(model))
    assert "(objective: lowest latency)" in text
    assert "| wo8-int8-compute | 0.9998 | 0.967 | – | 23.40 | 300.0 | (approved) |" in text
    assert "| wo8 | 0.9999 | 0.980 | – | 102.70 | 300.0 | passes every gate; not best by objective |" in text
    assert "| fp32 | 1.0000 | 1.000 | – | 28.00 | 300.0 | peak RSS 598 MB > share 370 MB" in text
    assert "| int8 |" not in text and "higher-cosine-lower-overlap" not in text


def test_nothing_closer_is_said_and_no_approval_says_nothing() -> None:
    best = row("fp32", 1.0, 1.0, "approved", "passes every gate; best by objective", 5.0)
    model = {"objective": "lowest_peak_rss", "candidates": [best, row("int8", 0.9, 0.6, "rejected", "x", 2.0)]}
    assert closer_lines(model)[0] == "No candidate is closer to fp32 than fp32 on every fidelity measure."
    best["verdict"] = "rejected"
    assert closer_lines(model) == []
