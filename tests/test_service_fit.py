"""The service fit's arithmetic: the line through runs at different tokens per run, and the tokens per
run at which more workers are predicted to fit."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.config import LoadedConfigs
from pipeline.memory import service_fit
from pipeline.memory.cgroup import Eviction
from pipeline.memory.service_fit import (
    OVERSHOOT_FACTOR,
    Activations,
    Savings,
    accept_queue,
    after_overshoot,
    line,
    measure_fit,
    tokens_for,
)
from serve.planner import container_peak, counted_peak
from tests.helpers import REPO

# One model proven at 32 × 128 tokens per run, 27.8 MB per 1,000 tokens (MiniLM's measured curve).
MINILM = Activations(((4096, 0.0278),), 128)
SLOPE = Savings.of([], MINILM)  # nothing measured yet: what fewer tokens save is the curve's slope


def run(workers: int, tokens: int, base: float = 57.0, per_worker: float = 160.0) -> dict[str, Any]:
    peak = base + workers * (per_worker - MINILM.saved_mb(tokens))
    return {"workers": workers, "tokens_per_run": tokens, "cgroup": {"peak_mb": peak - 5}, "pss_peak_mb": peak}


def test_the_counted_peak_is_the_larger_of_cgroup_and_own_pages() -> None:
    """Own pages where they were counted (the PSS sum where frame numbers were hidden), or the cgroup's
    peak when that is higher."""
    assert counted_peak(run(1, 4096)) == 217.0
    assert counted_peak({**run(1, 4096), "cgroup": {"peak_mb": 230.0}}) == 230.0
    assert counted_peak({**run(1, 4096), "own_peak_mb": 226.0}) == 226.0
    assert counted_peak({**run(1, 4096), "own_peak_mb": 226.0, "cgroup": {"peak_mb": 230.0}}) == 230.0


def test_what_stayed_cached_of_the_services_files_is_added_to_the_cgroups_peak() -> None:
    """Pages another process maps were never charged to the fit's cgroup; a fresh container pays them."""
    uncharged = {**run(1, 4096), "cgroup": {"peak_mb": 200.0}, "uncharged_mb": 30.0}
    assert container_peak(uncharged) == 230.0 and counted_peak(uncharged) == 230.0
    assert container_peak({**uncharged, "uncharged_mb": 0.0}) == 200.0
    assert counted_peak({**uncharged, "uncharged_mb": 0.0}) == 217.0  # own pages, now the larger


def test_the_line_recovers_base_and_per_worker_from_runs_at_fewer_tokens() -> None:
    base, per_worker = line([run(1, 4096), run(2, 4096), run(3, 3200), run(4, 1792)], SLOPE)
    assert base == pytest.approx(57.0) and per_worker == pytest.approx(160.0)


def test_more_workers_get_fewer_tokens_and_too_many_get_none() -> None:
    assert tokens_for(2, 57.0, 160.0, 15.0, SLOPE, 512) == 4096
    three, four = tokens_for(3, 57.0, 160.0, 15.0, SLOPE, 512), tokens_for(4, 57.0, 160.0, 15.0, SLOPE, 512)
    assert three is not None and four is not None and 4096 > three > four >= 128
    for workers, tokens in ((3, three), (4, four)):
        assert 57.0 + workers * (160.0 - MINILM.saved_mb(tokens) + 15.0) <= 512  # fits at these tokens
        assert 57.0 + workers * (160.0 - MINILM.saved_mb(tokens + 128) + 15.0) > 512  # and not at one row more
    assert tokens_for(8, 57.0, 160.0, 15.0, SLOPE, 512) is None


def stepped(workers: int, tokens: int) -> dict[str, Any]:
    """A run of workers whose arena saves in one step: nothing down to 2,900 tokens per run, 40 MB below
    (base 57, 160 MB per worker at full tokens); each worker's VmHWM shows it."""
    saved = 0.0 if tokens > 2900 else 40.0
    return {
        **run(workers, tokens),
        "pss_peak_mb": 57.0 + workers * (160.0 - saved),
        "worker_vmhwm_mb": [230.0 - saved] * workers,
        "workers_replaced": False,
    }


def test_what_each_run_saved_is_read_from_its_workers_not_from_the_slope() -> None:
    runs = [stepped(1, 4096), stepped(2, 4096), stepped(3, 3584), stepped(3, 3072), stepped(4, 1792)]
    savings = Savings.of(runs, MINILM)
    base, per_worker = line(runs, savings)
    assert base == pytest.approx(57.0) and per_worker == pytest.approx(160.0)
    errors = [
        (base + r["workers"] * (per_worker - savings.mb(r["tokens_per_run"]))) / counted_peak(r) - 1 for r in runs
    ]
    assert max(abs(e) for e in errors) < 1e-9
    slope_base, slope_per_worker = line(runs, SLOPE)  # the slope's line misses the measured peaks
    assert (
        max(
            abs(slope_base + r["workers"] * (slope_per_worker - MINILM.saved_mb(r["tokens_per_run"]))) / counted_peak(r)
            - 1
            for r in runs
        )
        > 0.05
    )
    # Interpolated between measured token counts, continued at the slope below the fewest.
    assert savings.mb(3584) == 0.0 and savings.mb(3072) == 0.0 and savings.mb(1792) == pytest.approx(40.0)
    assert savings.mb(2432) == pytest.approx(40.0 * (3072 - 2432) / (3072 - 1792))
    assert savings.mb(1280) == pytest.approx(40.0 + MINILM.saved_mb(1280) - MINILM.saved_mb(1792))
    # Three workers need 23.3 MB saved each: the slope says 3,200 tokens would do, the runs say 2,304.
    assert tokens_for(3, 57.0, 160.0, 15.0, SLOPE, 512) == 3200
    assert tokens_for(3, 57.0, 160.0, 15.0, savings, 512) == 2304


def test_a_count_over_the_budget_is_measured_again_at_least_its_overshoot_lower() -> None:
    """Measured 13 MB over at 3 workers (4.4 MB each): the next try is predicted to save twice that per
    worker at the build's slope, whatever the line predicts; nothing can save 200 MB a worker."""
    over = {**run(3, 3072), "pss_peak_mb": 512.0 - 3 * 15.0 + 13.0, "cgroup": None}
    fewer = after_overshoot(over, 15.0, MINILM, 512)
    aim = OVERSHOOT_FACTOR * 13.0 / 3
    assert fewer is not None and fewer % 128 == 0 and fewer < 3072
    assert MINILM.saved_mb(fewer) - MINILM.saved_mb(3072) >= aim
    assert MINILM.saved_mb(fewer + 128) - MINILM.saved_mb(3072) < aim  # and no more than that
    assert after_overshoot({**over, "pss_peak_mb": 512.0 + 600.0}, 15.0, MINILM, 512) is None


def test_the_accept_queue_counts_connections_no_worker_has_taken_yet() -> None:
    """The load releases its held bodies once the queue is empty, i.e. every worker holds its share."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        assert accept_queue(port) == 3
        accepted = [listener.accept()[0] for _ in range(3)]
        assert accept_queue(port) == 0
        for connection in [*clients, *accepted]:
            connection.close()
    assert accept_queue(port) is None


def fit_measured_by(
    monkeypatch: pytest.MonkeyPatch, measure_workers: Callable[..., dict[str, Any]], proven_tokens: int = 4096
) -> dict[str, Any]:
    """measure_fit of the default service over one model with MiniLM's memory curve, proven at
    `proven_tokens` per run, whose gunicorn runs `measure_workers` stands in for."""
    monkeypatch.setattr(service_fit, "measure_workers", measure_workers)
    monkeypatch.setattr(service_fit, "service_files", lambda *roots: iter(()))  # no gunicorn reads them
    monkeypatch.setattr(service_fit, "evict", lambda files: Eviction())
    monkeypatch.setattr(service_fit, "measure_one_process", lambda *_: {"worker_peak_mb": 150.0, "models": []})
    monkeypatch.setattr(service_fit, "load_bodies", lambda *_: [])
    model = SimpleNamespace(
        manifest={
            "metrics": {"memory_curve": {"per_1k_tokens_mb": 27.8}},
            "limits": {"max_tokens_per_run": proven_tokens},
        }
    )
    return measure_fit([model], LoadedConfigs(REPO / "configs" / "service.yaml"))  # type: ignore[list-item]


@pytest.mark.parametrize(("setting", "counts"), [(None, [1, 2, 3, 4]), ("2", [1, 2]), ("1", [1])])
def test_the_fit_measures_up_to_the_services_worker_count(
    setting: str | None, counts: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fit_max_workers (FIT_MAX_WORKERS) bounds the gunicorn runs, and so the workers the plan may offer."""
    if setting is not None:
        monkeypatch.setenv("FIT_MAX_WORKERS", setting)
    measured: list[int] = []

    def measure_workers(
        path: Path, workers: int, tokens: int, budget: float, bodies: list[Any], held: int, eviction: Eviction
    ) -> dict[str, Any]:
        measured.append(workers)
        measured_run = run(workers, tokens, per_worker=90.0)
        measured_run["cgroup"]["oom_kills"] = 0
        return {**measured_run, "workers_replaced": False, "worker_vmhwm_mb": [150.0]}

    fit = fit_measured_by(monkeypatch, measure_workers)
    assert measured == counts
    assert fit["max_workers_measured"] == counts[-1]


def test_two_workers_are_measured_even_when_one_run_cannot_tell_shared_pages_from_a_workers_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One worker at 300 MB, of which 200 are shared (libraries, mapped weights) and already at one row
    per run: the line through that run alone says two workers need 600 MB, so only measuring them shows
    that they fit (400 MB), and the third (500 MB plus waiting bodies) does not."""
    measured: list[tuple[int, int]] = []

    def measure_workers(
        path: Path, workers: int, tokens: int, budget: float, bodies: list[Any], held: int, eviction: Eviction
    ) -> dict[str, Any]:
        measured.append((workers, tokens))
        peak = 200.0 + 100.0 * workers
        return {
            "workers": workers,
            "tokens_per_run": tokens,
            "cgroup": {"peak_mb": peak - 5, "oom_kills": 0},
            "pss_peak_mb": peak,
            "workers_replaced": False,
            "worker_vmhwm_mb": [150.0] * workers,
        }

    fit = fit_measured_by(monkeypatch, measure_workers, proven_tokens=128)
    assert measured == [(1, 128), (2, 128)]
    assert fit["max_workers_measured"] == 2
    assert fit["base_mb"] == pytest.approx(200.0) and fit["per_worker_mb"] == pytest.approx(100.0)


def fit_with(monkeypatch: pytest.MonkeyPatch, cgroup: bool) -> dict[str, Any]:
    """measure_fit over runs whose cgroup is charged 45 MB less than the PSS sum at any count, and 12 MB
    less per worker (pages another cgroup read first are not charged to the service's); or no cgroup."""

    def measure_workers(
        path: Path, workers: int, tokens: int, budget: float, bodies: list[Any], held: int, eviction: Eviction
    ) -> dict[str, Any]:
        measured = run(workers, tokens, per_worker=90.0)
        pss = measured["pss_peak_mb"]
        measured["cgroup"] = {"peak_mb": pss - 45.0 - 12.0 * workers, "oom_kills": 0} if cgroup else None
        return {**measured, "workers_replaced": False, "worker_vmhwm_mb": [150.0] * workers}

    return fit_measured_by(monkeypatch, measure_workers)


def test_a_second_line_predicts_the_cgroup_peak_where_it_differs_from_the_pss_sum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fit = fit_with(monkeypatch, cgroup=True)
    assert fit["base_mb"] == pytest.approx(57.0, abs=0.1) and fit["per_worker_mb"] == pytest.approx(90.0, abs=0.1)
    assert fit["cgroup_line_mb"] == pytest.approx([12.0, 78.0], abs=0.1)
    runs = fit["runs"]
    assert len(runs) == 4 and all(abs(r["line_error"]) <= 0.001 and abs(r["cgroup_line_error"]) <= 0.001 for r in runs)
    # The counted line alone, read as a cgroup prediction, would miss every count by more than 20%.
    assert min(r["line_mb"] / r["cgroup"]["peak_mb"] - 1 for r in runs) > 0.2

    without = fit_with(monkeypatch, cgroup=False)
    assert without["cgroup_line_mb"] is None and all("cgroup_line_mb" not in r for r in without["runs"])
