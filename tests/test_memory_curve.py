"""The fitted memory curve and the micro-batch it derives."""

from __future__ import annotations

import pytest

from pipeline.memory.curve import MemoryCurve, curve_batches


def test_fit_recovers_a_linear_peak() -> None:
    points = [(t, 100.0 + 0.04 * t) for t in (128, 1024, 2048, 4096)]
    curve = MemoryCurve.fit(points)
    assert curve.base_mb == pytest.approx(100.0)
    assert curve.per_token_mb * 1000 == pytest.approx(40.0)
    assert curve.to_json()["per_1k_tokens_mb"] == 40.0


def test_rows_within_a_share() -> None:
    curve = MemoryCurve(((128, 105.0), (4096, 265.0)), base_mb=100.0, per_token_mb=0.04)
    assert curve.rows_within(share_mb=300, row_tokens=128, max_rows=32) == 32  # capped at max_batch
    assert curve.rows_within(share_mb=200, row_tokens=128, max_rows=32) == 19  # (200-100)/(0.04*128)
    assert curve.rows_within(share_mb=90, row_tokens=128, max_rows=32) == 0  # not even one row


def test_curve_needs_two_sizes_and_batches_are_distinct() -> None:
    with pytest.raises(ValueError, match="two or more token counts"):
        MemoryCurve.fit([(128, 100.0), (128, 101.0)])
    assert curve_batches(32) == [1, 8, 16, 32]
    assert curve_batches(2) == [1, 2]
    assert curve_batches(1) == [1]
