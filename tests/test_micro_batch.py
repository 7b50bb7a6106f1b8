"""The micro-batch by speed: the fewest rows per run the whole batch is not measurably faster than, timed
on a real (tiny) model; how the measure stage uses it is in test_search.py."""

from __future__ import annotations

import pytest

from pipeline.micro_batch import (
    MICRO_BATCH_SLOWDOWN,
    fewest_rows_at_full_speed,
    row_ladder,
    row_timings_from_json,
    row_timings_json,
    time_micro_batches,
)
from pipeline.ranking import Timing
from serve.config import Limits, SessionSettings
from tests.conftest import TinyRun


def timing(median: float, spread: float = 0.0) -> Timing:
    return Timing(median, median - spread / 2, median + spread / 2, 3)


def test_the_ladder_doubles_below_the_whole_batch() -> None:
    assert row_ladder(32) == [1, 2, 4, 8, 16]
    assert row_ladder(24) == [1, 2, 4, 8, 16]
    assert row_ladder(2) == [1]
    assert row_ladder(1) == []


@pytest.mark.parametrize(
    ("case", "medians", "rows"),
    [
        # MiniLM int8, 2 threads, 32 × 128 (benchmarks/results/micro-batch-minilm-2026-12-06.md): flat.
        ("flat: one row", {32: 548.0, 1: 513.6}, 1),
        ("one row slower by less than the margin", {32: 500.0, 1: 500.0 * MICRO_BATCH_SLOWDOWN * 0.99}, 1),
        ("the whole batch faster than 1 and 2 rows, not 4", {32: 100.0, 1: 300.0, 2: 150.0, 4: 105.0}, 4),
        ("faster than every count timed", {32: 100.0, 1: 400.0, 2: 300.0, 4: 200.0, 8: 150.0, 16: 120.0}, 32),
    ],
)
def test_the_fewest_rows_the_whole_batch_is_not_faster_than(case: str, medians: dict[int, float], rows: int) -> None:
    assert fewest_rows_at_full_speed({r: timing(m) for r, m in medians.items()}, 32) == rows, case


def test_a_gap_within_the_rounds_spread_keeps_the_fewer_rows() -> None:
    """1.3× apart by their medians, but the rounds spread wider than the gap: noise, not speed."""
    timings = {32: timing(100.0, spread=40.0), 1: timing(130.0, spread=40.0)}
    assert fewest_rows_at_full_speed(timings, 32) == 1
    timings[1] = timing(130.0, spread=10.0)
    timings[32] = timing(100.0, spread=10.0)
    assert fewest_rows_at_full_speed(timings, 32) == 32


def test_timings_round_trip_through_json() -> None:
    timings = {32: timing(548.0, 10.0), 1: timing(513.6, 4.0)}
    assert row_timings_from_json(row_timings_json(timings)) == timings


def test_a_real_model_is_timed_up_the_ladder_until_a_count_is_fast_enough(tiny_run: TinyRun) -> None:
    """A fresh process times the whole batch beside each step of the ladder, fewest rows first, and
    stops at the first step the rule keeps: every step below the chosen one was timed, none above."""
    from serve.artifacts import load_approved

    folder = load_approved(tiny_run.artifacts / "tiny-embed").folder
    limits = Limits(max_batch=8, max_seq_len=64)
    timings = time_micro_batches(folder, SessionSettings(), limits)
    chosen = fewest_rows_at_full_speed(timings, 8)
    steps = sorted(set(timings) - {8})
    assert 8 in timings and all(t.rounds == 3 and 0 < t.low_ms <= t.median_ms <= t.high_ms for t in timings.values())
    assert steps == [r for r in row_ladder(8) if r <= chosen], (timings, chosen)
