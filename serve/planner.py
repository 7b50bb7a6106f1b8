"""Worker planner: will `master + workers × worker peak` fit the budget? Refuse instead of an OOM kill."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from serve.artifacts import APPROVED_FILE, ArtifactError, load_approved, read_json
from serve.config import ServiceConfig, load_service_config, model_names, resolve
from serve.memory import status_mb

MASTER_IMPORTS = "import gunicorn.app.wsgiapp, gunicorn.arbiter, serve.planner"
SERVICE_FIT_FILE = "service-fit.json"


def worker_peak_mb(peaks: list[tuple[float, float]]) -> float:
    """Peak of one worker hosting several models: the import floor once, plus each model's own share above
    it (peak − floor), each measured alone in a fresh process at its worst-case input."""
    floor = max(f for _, f in peaks)
    return floor + sum(peak - f for peak, f in peaks)


def measured_worker_peak(artifacts: Path, approvals: dict[str, str]) -> float | None:
    """The worker peak `memfit optimize` measured with all these approvals loaded together, if the
    measurement is of exactly the current approvals."""
    try:
        fit = read_json(artifacts / SERVICE_FIT_FILE)
    except ArtifactError:
        return None
    return float(fit["worker_peak_mb"]) if fit.get("approvals") == approvals else None


def idle_master_mb() -> float:
    """RSS of a fresh interpreter that imports what the gunicorn master imports."""
    code = f"{MASTER_IMPORTS}; from serve.memory import status_mb; print(status_mb())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def worker_figures(config: ServiceConfig, path: Path) -> tuple[float, dict[str, str]]:
    """The proven peak of one worker hosting every model of the service (the whole-service fit when it
    measured exactly the current approvals, else the per-model sum) and the approvals it covers;
    ArtifactError when a model has no approval."""
    artifacts = resolve(path, config.artifacts_dir)
    peaks, approvals = [], {}
    for name in model_names(config, path):
        try:
            metrics = load_approved(artifacts / name, verify=False).manifest["metrics"]
            approvals[name] = read_json(artifacts / name / APPROVED_FILE)["sha256"]
        except KeyError as exc:
            raise ArtifactError(f"{name}: manifest lacks {exc}") from None
        peaks.append((float(metrics["peak_rss_mb"]), float(metrics["rss_after_imports_mb"])))
    return measured_worker_peak(artifacts, approvals) or worker_peak_mb(peaks), approvals


def proven_worker_peak(config: ServiceConfig, path: Path) -> float | None:
    """What the watchdog holds a worker to; None when some model has no approval."""
    try:
        return worker_figures(config, path)[0]
    except ArtifactError:
        return None


def plan(service_path: Path, workers: int, master_mb: float) -> tuple[bool, str]:
    config, path = load_service_config(service_path)
    try:
        worker, _ = worker_figures(config, path)
    except ArtifactError as exc:
        return False, f"memfit plan: no approved artifact ({exc}); run `make optimize`"
    budget = config.budget_mb
    fits_at_most = max(0, int((budget - master_mb) // worker))
    needed = master_mb + workers * worker
    arithmetic = f"master {master_mb:,.0f} + {workers} × worker {worker:,.0f} MB"
    if needed <= budget:
        return True, f"WORKERS={workers} needs ~{needed:,.0f} MB ({arithmetic}); fits budget {budget:,.0f} MB"
    most = f"fits at most {fits_at_most} worker{'s' if fits_at_most != 1 else ''}"
    return False, f"WORKERS={workers} needs ~{needed:,.0f} MB ({arithmetic}); budget {budget:,.0f} MB {most}"


def plan_from_config(service_path: Path, workers: int | None = None) -> tuple[bool, str]:
    """`memfit plan`: the same arithmetic as the master's start-up check, with a measured idle master."""
    count = workers if workers is not None else int(os.environ.get("WORKERS", "1"))
    return plan(service_path, count, idle_master_mb())


def check_at_master_start(service_path: Path, workers: int) -> tuple[bool, str]:
    """Inside the gunicorn master: its own RSS is the master figure."""
    return plan(service_path, workers, status_mb())
