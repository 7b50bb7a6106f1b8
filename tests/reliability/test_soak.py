"""Soak: ≥ 10,000 mixed requests from concurrent clients (SOAK_CLIENTS) against one real MiniLM worker:
no 5xx, peak RSS under budget, and a flat RSS trend over the last half (a leak would show as a slope).
SOAK_REQUESTS raises the count."""

from __future__ import annotations

import os

import pytest

from pipeline.memory.harness import GunicornService, request_mix, soak
from serve.config import load_service_config
from tests.conftest import MinilmRun
from tests.helpers import REPO

pytestmark = [pytest.mark.reliability, pytest.mark.soak]
SERVICE = REPO / "configs" / "service.yaml"
MAX_SLOPE_MB_PER_1K = 0.5  # 10,000 requests may add at most 5 MB


def test_soak_one_worker(minilm_run: MinilmRun) -> None:
    config, _ = load_service_config(SERVICE)
    count = int(os.environ.get("SOAK_REQUESTS", "10000"))
    # Mostly small requests (as real traffic is: a query, a sentence), every 100th the worst case the
    # service accepts.
    mix = request_mix(count, 4, 64, seed=1, worst_every=100, max_words=24)
    worst = request_mix(1, config.limits.max_batch, config.limits.max_seq_len)[0]
    for index in range(0, count, 100):
        mix[index] = worst
    # No max_requests recycling: a leak must show in the trend, not be reset by a fresh worker.
    with GunicornService(SERVICE, env={**minilm_run.env, "MAX_REQUESTS": "0"}) as service:
        result = soak(service, "/api/embed", mix)
    print(f"soak: {result}")
    assert result["requests"] >= 10_000
    assert result["server_errors"] == 0, result["statuses"]
    assert result["statuses"] == {200: count}
    assert result["peak"]["total_rss"] <= config.budget_mb
    assert abs(result["slope_mb_per_1k_requests"]) <= MAX_SLOPE_MB_PER_1K
