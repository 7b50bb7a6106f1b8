"""Prometheus metrics, served at `GET /metrics` in the text format: requests and their latency by
route, model and status; tokens read and session runs per model; each worker's RSS and PSS beside its
proven peak; watchdog recycles.

gunicorn workers are separate processes: with more than one, gunicorn.conf.py points
PROMETHEUS_MULTIPROC_DIR at a fresh folder before anything imports this module, every worker writes its
values there (prometheus_client's multiprocess mode), and any worker's `/metrics` reads them all.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from serve.memory import rollup_mb, status_mb
from serve.watchdog import Watchdog

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
BY_REQUEST = ("route", "model", "status")

REQUESTS = Counter("memfit_requests", "Requests answered", BY_REQUEST)
LATENCY = Histogram(
    "memfit_request_duration_seconds",
    "Time from the request reaching the app to its answer",
    BY_REQUEST,
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
TOKENS = Counter("memfit_tokens", "Tokens the models read, special tokens included", ["model"])
SESSION_RUNS = Counter("memfit_session_runs", "Micro-batches run (one session run each)", ["model"])
# Per live worker (multiprocess mode labels each with its pid).
WORKER_RSS = Gauge("memfit_worker_rss_mb", "The worker's RSS (MiB)", multiprocess_mode="liveall")
WORKER_PSS = Gauge("memfit_worker_pss_mb", "The worker's PSS: shared pages split (MiB)", multiprocess_mode="liveall")
PROVEN_PEAK = Gauge(
    "memfit_worker_proven_peak_mb", "The peak a worker's approval proves (MiB)", multiprocess_mode="max"
)
RECYCLES = Gauge(
    "memfit_watchdog_recycles", "Workers recycled over their proven peak since start", multiprocess_mode="max"
)


def record_request(route: str, model: str, status: int, seconds: float) -> None:
    labels = (route, model, str(status))
    REQUESTS.labels(*labels).inc()
    LATENCY.labels(*labels).observe(seconds)


def record_inference(model: str, tokens: int, session_runs: int) -> None:
    TOKENS.labels(model).inc(tokens)
    SESSION_RUNS.labels(model).inc(session_runs)


PSS_EVERY_S = 1.0  # reading PSS walks every mapping (~0.8 ms for a worker): at most once a second
_pss_read_at = [0.0]


def record_memory(watchdog: Watchdog | None, fresh: bool = False) -> None:
    """This worker's memory now (PSS at most every PSS_EVERY_S), after a request; `fresh`, for a scrape:
    PSS now, and the watchdog's figures (which change only when a worker is recycled)."""
    WORKER_RSS.set(status_mb())
    now = time.monotonic()
    if fresh or now - _pss_read_at[0] >= PSS_EVERY_S:
        _pss_read_at[0] = now
        WORKER_PSS.set(rollup_mb()["pss"])
    if fresh and watchdog is not None:
        PROVEN_PEAK.set(watchdog.proven_peak_mb)
        RECYCLES.set(watchdog.status()["recycles"])


def exposition() -> bytes:
    """Every worker's metrics in multiprocess mode, else this process's."""
    if os.environ.get(MULTIPROCESS_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def forget_process(pid: int) -> None:
    """Drop a process's per-process gauges: a worker that exited (gunicorn's child_exit), and the
    master's, created empty when it imported this module."""
    if os.environ.get(MULTIPROCESS_ENV):
        multiprocess.mark_process_dead(pid)
