"""Worker planner: will W workers fit the budget, counted the way the kernel counts? Refuse instead of an
OOM kill; WORKERS=auto starts the most that fit.

The figures come from `service-fit.json`, which `memfit optimize` measures on the real service for
W = 1, 2, … workers (pipeline/memory/service_fit.py), more workers each at fewer tokens per session run: a
measured W needs its measured peak plus W × the bodies waiting for the inference lock, and its workers
run at the tokens per run it was measured at (MAX_TOKENS_PER_RUN, set for them by the gunicorn master).
An unmeasured W is extrapolated on the line through the runs, at full tokens per run. Shared pages
(libraries, memory-mapped prepacked weights) are in the line's base once. Where that measurement is
missing or is of other approvals, the planner falls back to RSS arithmetic (master + W × one-process
worker peak), which counts shared pages once per process and so overstates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.artifacts import ArtifactError, approval_pointer, load_approved, read_json
from serve.config import ConfigError, ServiceConfig, load_service_config, model_names, resolve
from serve.memory import status_mb

# What the gunicorn master imports for its workers to share: all a worker imports. onnxruntime's import
# leaves a thread pool that a forked worker cannot join at interpreter exit: workers end without the
# interpreter's teardown (serve/gunicorn.conf.py, worker_exit).
PRELOADED = ("onnxruntime", "tokenizers", "serve.apis.native", "serve.apis.openai", "serve.apis.tei")
MASTER_IMPORTS = f"import gunicorn.app.wsgiapp, gunicorn.arbiter, serve.planner, {', '.join(PRELOADED)}"
SERVICE_FIT_FILE = "service-fit.json"


def container_peak(run: dict[str, Any]) -> float:
    """The cgroup's peak of a service-fit run plus what stayed cached, charged elsewhere, of the files its
    service maps (the libraries some other process maps: `uncharged_mb`): what the cgroup of a container
    that had just started would have peaked at."""
    return float(run["cgroup"]["peak_mb"]) + float(run.get("uncharged_mb", 0.0))


def own_peak(run: dict[str, Any]) -> float:
    """The service's own resident pages at a service-fit run's peak, each counted once (the PSS sum where
    frame numbers were hidden): the PSS sum of a container that holds only the service."""
    return float(run.get("own_peak_mb") or run["pss_peak_mb"])


def counted_peak(run: dict[str, Any]) -> float:
    """What a service-fit run counts: the larger of the container's peak and the service's own pages. The
    first counts page cache no process maps, the second is all there is where no cgroup could be made."""
    return max(container_peak(run) if run["cgroup"] else 0.0, own_peak(run))


def worker_peak_mb(peaks: list[tuple[float, float]]) -> float:
    """Peak of one worker hosting several models: the import floor once, plus each model's own share above
    it (peak − floor), each measured alone in a fresh process at its worst-case input."""
    floor = max(f for _, f in peaks)
    return floor + sum(peak - f for peak, f in peaks)


def idle_master_mb() -> float:
    """RSS of a fresh interpreter that imports what the gunicorn master imports."""
    code = f"{MASTER_IMPORTS}; from serve.memory import status_mb; print(status_mb())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


@dataclass(frozen=True)
class WorkerFigures:
    """What the plan knows of the service's current approvals."""

    worker_peak_mb: float  # one worker's proven VmHWM: what the watchdog holds it to
    fit: dict[str, Any] | None  # the measured service fit, when it is of exactly these approvals

    def measured_run(self, workers: int) -> dict[str, Any] | None:
        """The last run of `workers` workers (the fit measures a count again at fewer tokens when over)."""
        runs = [r for r in (self.fit or {}).get("runs", []) if r["workers"] == workers]
        return runs[-1] if runs else None

    def tokens_per_run(self, workers: int) -> int | None:
        """The tokens per run `workers` workers were measured to fit at (None: as each approval proves)."""
        run = self.measured_run(workers)
        return int(run["tokens_per_run"]) if run and workers > 1 else None

    def predicted_mb(self, workers: int) -> tuple[float | None, float | None, float | None]:
        """The fit's lines at `workers` workers: (counted peak, container's cgroup peak, own pages); at the
        measured run's tokens per run, full tokens beyond the runs. None where no fit (or no such line)
        was measured."""
        if self.fit is None:
            return None, None, None
        run = self.measured_run(workers)
        if run is not None:
            return float(run["line_mb"]), run.get("cgroup_line_mb"), run.get("own_line_mb")
        cgroup, own = self.fit.get("cgroup_line_mb"), self.fit.get("own_line_mb")
        return (
            self.fit["base_mb"] + workers * self.fit["per_worker_mb"],
            None if cgroup is None else cgroup[0] + workers * cgroup[1],
            None if own is None else own[0] + workers * own[1],
        )

    def needed_mb(self, workers: int, master_mb: float) -> tuple[float, str]:
        """Predicted peak of master + `workers` workers, and the arithmetic behind it."""
        run = self.measured_run(workers)
        if self.fit is not None and run is not None:
            return float(run["planned_mb"]), (
                f"measured with {workers} worker{'s' if workers > 1 else ''} at {run['tokens_per_run']} tokens per "
                f"run: {counted_peak(run):,.0f} + {workers} × waiting bodies {self.fit['held_bodies_mb']:,.0f} MB"
            )
        if self.fit is None:
            needed = master_mb + workers * self.worker_peak_mb
            return needed, (
                f"RSS arithmetic, no service fit measured: master {master_mb:,.0f} + {workers} × worker "
                f"{self.worker_peak_mb:,.0f} MB"
            )
        base, per_worker, held = self.fit["base_mb"], self.fit["per_worker_mb"], self.fit["held_bodies_mb"]
        needed = base + workers * (per_worker + held)
        return needed, (
            f"extrapolated from the measured runs: base {base:,.0f} + {workers} × (worker {per_worker:,.0f} + "
            f"waiting bodies {held:,.0f}) MB"
        )

    def most_workers(self, budget_mb: float, master_mb: float) -> int:
        """The most workers that fit (never more than the service fit measured to fit)."""
        limit = self.fit["max_workers_measured"] if self.fit else 64
        fitting = [w for w in range(1, limit + 1) if self.needed_mb(w, master_mb)[0] <= budget_mb]
        return max(fitting, default=0)


def worker_figures(config: ServiceConfig, path: Path) -> tuple[WorkerFigures, dict[str, str]]:
    """The figures of the current approvals and the approvals they cover; ArtifactError when a model has
    no approval."""
    artifacts = resolve(path, config.artifacts_dir)
    peaks, approvals = [], {}
    for name in model_names(config, path):
        try:
            pending = config.pending_approvals
            metrics = load_approved(artifacts / name, verify=False, pending=pending).manifest["metrics"]
            approvals[name] = read_json(approval_pointer(artifacts / name, pending))["sha256"]
        except KeyError as exc:
            raise ArtifactError(f"{name}: manifest lacks {exc}") from None
        peaks.append((float(metrics["peak_rss_mb"]), float(metrics["rss_after_imports_mb"])))
    try:
        fit: dict[str, Any] | None = read_json(artifacts / SERVICE_FIT_FILE)
    except ArtifactError:
        fit = None
    if fit is not None and (fit.get("approvals") != approvals or "per_worker_mb" not in fit):
        fit = None
    peak = float(fit["worker_peak_mb"]) if fit else worker_peak_mb(peaks)
    return WorkerFigures(peak, fit), approvals


def proven_worker_peak(config: ServiceConfig, path: Path) -> float | None:
    """What the watchdog holds a worker to; None when some model has no approval."""
    try:
        return worker_figures(config, path)[0].worker_peak_mb
    except ArtifactError:
        return None


def plan(service_path: Path, workers: int, master_mb: float) -> tuple[bool, str]:
    config, path = load_service_config(service_path)
    try:
        figures, _ = worker_figures(config, path)
    except ArtifactError as exc:
        return False, f"memfit plan: no approved artifact ({exc}); run `make optimize`"
    budget = config.budget_mb
    needed, arithmetic = figures.needed_mb(workers, master_mb)
    if needed <= budget:
        return True, f"WORKERS={workers} needs ~{needed:,.0f} MB ({arithmetic}); fits budget {budget:,.0f} MB"
    most = figures.most_workers(budget, master_mb)
    fits_at_most = f"fits at most {most} worker{'s' if most != 1 else ''}"
    return False, f"WORKERS={workers} needs ~{needed:,.0f} MB ({arithmetic}); budget {budget:,.0f} MB {fits_at_most}"


def table(service_path: Path, master_mb: float, up_to: int = 8) -> list[str]:
    """`memfit plan`'s table per worker count: the peak the fit's lines predict (the counted peak, the
    container's and the own pages), the measured figures beside them, and what the budget check plans (the
    measured peak, or the prediction, plus the bodies waiting for the inference lock)."""
    config, path = load_service_config(service_path)
    figures, _ = worker_figures(config, path)
    measured = {run["workers"]: run for run in (figures.fit or {}).get("runs", [])}
    lines = [
        "workers | tokens/run | predicted MB | predicted container MB | predicted own pages MB | measured container MB "
        "| measured PSS sum MB | measured own pages MB | planned MB | fits"
    ]
    for workers in range(1, up_to + 1):
        needed, _ = figures.needed_mb(workers, master_mb)
        predicted = " | ".join("-" if mb is None else f"{mb:,.0f}" for mb in figures.predicted_mb(workers))
        run = measured.get(workers, {})
        container = f"{container_peak(run):.1f}" if run.get("cgroup") else "-"
        fits = needed <= config.budget_mb and workers <= figures.most_workers(config.budget_mb, master_mb)
        lines.append(
            f"{workers} | {run.get('tokens_per_run', 'full')} | {predicted} | {container} | "
            f"{run.get('pss_peak_mb', '-')} | {run.get('own_peak_mb') or '-'} | {needed:,.0f} | "
            f"{'yes' if fits else 'no'}"
        )
    return lines


def worker_tokens(service_path: Path, workers: int) -> int | None:
    """The tokens per run `workers` workers must keep to, by the plan (None: as each approval proves)."""
    config, path = load_service_config(service_path)
    try:
        return worker_figures(config, path)[0].tokens_per_run(workers)
    except ArtifactError:
        return None


def resolve_workers(raw: str, service_path: Path) -> int:
    """WORKERS as given ("auto": the most that fit, at least one); ConfigError for anything else."""
    if raw == "auto":
        config, path = load_service_config(service_path)
        try:
            figures, _ = worker_figures(config, path)
        except ArtifactError:
            return 1
        return max(1, figures.most_workers(config.budget_mb, idle_master_mb()))
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"WORKERS={raw!r}: must be a positive integer or auto")
    return int(raw)


def plan_from_config(service_path: Path, workers: int | None = None) -> tuple[bool, str]:
    """`memfit plan`: the same arithmetic as the master's start-up check, with a measured idle master."""
    count = workers if workers is not None else resolve_workers(os.environ.get("WORKERS", "1"), service_path)
    return plan(service_path, count, idle_master_mb())


def check_at_master_start(service_path: Path, workers: int) -> tuple[bool, str]:
    """Inside the gunicorn master: its own RSS is the master figure."""
    return plan(service_path, workers, status_mb())
