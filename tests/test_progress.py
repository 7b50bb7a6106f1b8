from __future__ import annotations

import itertools

import pytest

from pipeline import progress


def test_off_a_terminal_a_long_loop_prints_a_line_every_interval(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = itertools.count(step=progress.LOG_INTERVAL_S * 2 / 3)  # each item takes two thirds of the interval
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    assert list(progress.bar(range(5), "mpnet: evaluate fp32")) == list(range(5))
    assert list(progress.bar((n for n in range(3)), "rank nodes")) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines() == [
        "memfit: mpnet: evaluate fp32: 2 of 5 (40%), 40 s",
        "memfit: mpnet: evaluate fp32: 4 of 5 (80%), 80 s",
        "memfit: rank nodes: 2, 40 s",
    ]


def test_a_short_loop_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(progress.bar([1, 2, 3], "measure peak RSS")) == [1, 2, 3]
    assert capsys.readouterr().err == ""
