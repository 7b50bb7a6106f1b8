"""The service fit's arithmetic: the line through runs at different tokens per run, and the tokens per
run at which more workers are predicted to fit."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from pipeline.memory.service_fit import (
    OVERSHOOT_FACTOR,
    Activations,
    accept_queue,
    after_overshoot,
    counted_peak,
    line,
    tokens_for,
)

# One model proven at 32 × 128 tokens per run, 27.8 MB per 1,000 tokens (MiniLM's measured curve).
MINILM = Activations(((4096, 0.0278),), 128)


def run(workers: int, tokens: int, base: float = 57.0, per_worker: float = 160.0) -> dict[str, Any]:
    peak = base + workers * (per_worker - MINILM.saved_mb(tokens))
    return {"workers": workers, "tokens_per_run": tokens, "cgroup": {"peak_mb": peak - 5}, "pss_peak_mb": peak}


def test_the_counted_peak_is_the_larger_of_cgroup_and_pss() -> None:
    assert counted_peak(run(1, 4096)) == 217.0
    assert counted_peak({**run(1, 4096), "cgroup": {"peak_mb": 230.0}}) == 230.0


def test_the_line_recovers_base_and_per_worker_from_runs_at_fewer_tokens() -> None:
    base, per_worker = line([run(1, 4096), run(2, 4096), run(3, 3200), run(4, 1792)], MINILM)
    assert base == pytest.approx(57.0) and per_worker == pytest.approx(160.0)


def test_more_workers_get_fewer_tokens_and_too_many_get_none() -> None:
    assert tokens_for(2, 57.0, 160.0, 15.0, MINILM, 512) == 4096
    three, four = tokens_for(3, 57.0, 160.0, 15.0, MINILM, 512), tokens_for(4, 57.0, 160.0, 15.0, MINILM, 512)
    assert three is not None and four is not None and 4096 > three > four >= 128
    for workers, tokens in ((3, three), (4, four)):
        assert 57.0 + workers * (160.0 - MINILM.saved_mb(tokens) + 15.0) <= 512  # fits at these tokens
        assert 57.0 + workers * (160.0 - MINILM.saved_mb(tokens + 128) + 15.0) > 512  # and not at one row more
    assert tokens_for(8, 57.0, 160.0, 15.0, MINILM, 512) is None


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
    """The load releases its held bodies once the queue is empty, i.e. every worker holds one."""
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
