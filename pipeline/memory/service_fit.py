"""Whole-service fit, measured the way the kernel counts: the real service (serve/gunicorn.conf.py on
127.0.0.1) with W = 1, 2, … workers (up to the service's `fit_max_workers`), inside a memory cgroup
limited to the budget where one can be created, while a separate process samples the PSS of master and
workers and counts the pages they map (each once: their own pages, as a container holding only them).

Every worker runs every load body at the same moment, while the next waits: the fit starts gunicorn
with two connections per worker (WORKER_CONNECTIONS=2), opens 2W connections, sends each all but the last
byte of the body, and releases them together. So each worker holds exactly two requests, one running
while the other waits for the inference lock with its body read, and the peaks coincide, as they would
when every worker of a loaded service meets its worst case at once. The bodies are each model's
worst-case request, its largest requests of shorter inputs, and its hostile bodies (serve/probe.py), with
TRUNCATE on (the heavier mode: cut inputs are embedded, not refused). Before each run every file the
service may read is evicted from the page cache, so that the cgroup is charged for reading it as a
container that has just started is, at every count alike: otherwise the build that wrote the model, or
whichever run read it first, keeps the charge (mpnet: 112.1 MB at one worker, 293.9 MB at two, which read
the prepacked file anew), and the libraries stay charged to the build (MiniLM, one worker: a cgroup peak
of 136.9 MB, where a fresh container's is above 220). What stays cached because another process maps it
(the build's own libraries) is added to the cgroup's peak where the service maps it too (`uncharged_mb`). A worker can
read THREADS requests at once; the others waiting hold at most their raw body each, so (THREADS - 2) ×
max_body_bytes per worker is added to the plan rather than measured.

A least-squares line through the measured peaks (of the runs where no worker was killed), each raised by
what its workers' VmHWM shows their smaller micro-batch saved, gives the planner its figures: W workers
at full tokens per run cost base + W × per worker. The line runs through the counted peak (the larger of
cgroup peak and own pages, serve/planner.py); a second line runs through the cgroup peaks alone, so that
the plan predicts each counter the kernel keeps, not only the larger. The one-process probe of all models together stays
as the fast first estimate and as the watchdog's floor.

The fit is cached under build/_service/, keyed by every approved file's sha256, each model's session
options, limits and runtime spec, the service config, and the runtime's versions and CPU flags: a rerun
that approves the same files reuses it (and says so) instead of running gunicorn again.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import json_bytes, write_bytes_atomic
from pipeline.cache import ResultCache, cache_key
from pipeline.config import LoadedConfigs
from pipeline.memory.cgroup import Eviction, MemoryCgroup, evict, service_files, unavailable_reason
from pipeline.memory.harness import GunicornService, mapped_pages
from pipeline.memory.probe import PROJECT_ROOT, run_probe
from pipeline.memory.sampler import SamplerProcess
from pipeline.progress import step
from serve.apis.native import INFERENCE_PATHS
from serve.artifacts import ApprovedArtifact, approval_pointer, load_approved, read_json
from serve.memory import status_mb
from serve.planner import SERVICE_FIT_FILE, container_peak, counted_peak, idle_master_mb, own_peak
from serve.probe import hostile_bodies, shape_history, sweep_requests, worst_case_texts

FIT_TRIES = 4  # runs per worker count: the first at the line's prediction, then fewer tokens while over
# After a count overshoots, the next try aims to save this many times the overshoot: between arena steps
# a few rows less saved 15–90% of what the curve's slope predicts, so aiming at the overshoot alone took
# MiniLM's 3 workers four runs of ~1 min (3712 → 3328 → 3200 → 3072 tokens); twice it, three (3584 → 3200 → 3072).
OVERSHOOT_FACTOR = 2.0
ACCEPT_WAIT_S = 2.0  # at most this long for every worker to accept its held connections
# Requests each worker holds in the fit: one running, the next waiting. Measured with one each, the cgroup
# line missed a 4-client mixed load by 5.7% at 2 and 3 MiniLM workers: each worker reads the next request
# while one runs (anonymous memory at 2 workers: 102.6 MB with one each, 105.3 under the load, 108.0 with
# two each).
HELD_PER_WORKER = 2
FIT_VERSION = 10  # bump when the fit's measurement changes: cached fits keyed on it are then redone
MB = 1024 * 1024


def load_bodies(artifacts: list[ApprovedArtifact], configs: LoadedConfigs) -> list[tuple[str, bytes]]:
    """(path, body) of everything every worker is sent, model by model."""
    limits = configs.service.limits
    bodies = []
    for artifact in artifacts:
        path = INFERENCE_PATHS[artifact.manifest["task"]]
        requests = shape_history(limits.max_batch, limits.max_seq_len)
        requests += [worst_case_texts(limits.max_batch, limits.max_seq_len)]
        requests += sweep_requests(limits.max_batch, limits.max_seq_len)
        bodies += [(path, json.dumps({"model": artifact.model, "inputs": texts}).encode()) for texts in requests]
        chars = int(artifact.manifest["limits"]["max_input_chars"])
        hostile = hostile_bodies(limits.max_batch, limits.max_body_bytes, chars, artifact.model)
        bodies += [(path, body) for _, body in hostile]
    return bodies


def held_request(port: int, method: str, path: str, body: bytes, release: threading.Barrier) -> tuple[int, bytes]:
    """Send a request but its last byte, wait until every client of the round has, then the last byte:
    (status, response body); 599 when the connection failed (a worker killed meanwhile) or another
    client of the round did."""
    raw = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
            sock.sendall(raw[:-1])
            release.wait(timeout=120)
            sock.sendall(raw[-1:])
            answer = b"".join(iter(lambda: sock.recv(1 << 16), b""))
    except (OSError, threading.BrokenBarrierError):
        release.abort()  # the round's other clients stop waiting for this one
        return 599, b""
    head, _, content = answer.partition(b"\r\n\r\n")
    return (int(head.split(b" ", 2)[1]), content) if head.startswith(b"HTTP/") else (599, b"")


def accept_queue(port: int) -> int | None:
    """Connections waiting to be accepted on 127.0.0.1:`port`: Linux shows a listening socket's accept
    queue as its rx_queue in /proc/net/tcp. None when no such listener can be read."""
    address = f"{int.from_bytes(socket.inet_aton('127.0.0.1'), sys.byteorder):08X}:{port:04X}"
    try:
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    except OSError:
        return None
    listening = [row for row in rows if row[1] == address and row[3] == "0A"]
    return int(listening[0][4].split(":")[1], 16) if listening else None


def wait_until_accepted(port: int) -> None:
    """Until no connection waits in the accept queue: with as many connections as the workers together
    take, every worker then holds its share. Where the queue cannot be read, ACCEPT_WAIT_S is waited out instead."""
    deadline = time.monotonic() + ACCEPT_WAIT_S
    while time.monotonic() < deadline:
        waiting = accept_queue(port)
        if waiting == 0:
            return
        time.sleep(0.005 if waiting is not None else ACCEPT_WAIT_S)


def lockstep(port: int, connections: int, method: str, path: str, body: bytes) -> list[tuple[int, bytes]]:
    """`connections` requests, released together once the workers have accepted every one (each worker
    holds at most WORKER_CONNECTIONS at a time)."""
    release = threading.Barrier(connections, action=lambda: wait_until_accepted(port))
    with ThreadPoolExecutor(connections) as pool:
        return list(pool.map(lambda _: held_request(port, method, path, body, release), range(connections)))


def wait_for_every_worker(service: GunicornService, workers: int, held: int, timeout: float = 120.0) -> None:
    """Until a lockstep round of /api/health is answered `held` times by each of `workers` pids: every
    worker has loaded its models and takes `held` connections of each round."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answers = lockstep(service.port, workers * held, "GET", "/api/health", b"")
        pids = Counter(json.loads(content)["pid"] for status, content in answers if status == 200)
        if len(pids) == workers and set(pids.values()) == {held}:
            return
    raise RuntimeError(f"the service did not spread its connections over {workers} workers: {service.log()}")


def run_lockstep(service: GunicornService, connections: int, bodies: list[tuple[str, bytes]]) -> dict[int, int]:
    """Every body on `connections` connections at once; counts of the answers' status codes."""
    statuses: dict[int, int] = {}
    for path, body in bodies:
        for code, _ in lockstep(service.port, connections, "POST", path, body):
            statuses[code] = statuses.get(code, 0) + 1
    return statuses


def measure_workers(
    service_path: Path,
    workers: int,
    tokens: int,
    budget_mb: float,
    bodies: list[tuple[str, bytes]],
    held: int,
    eviction: Eviction,
) -> dict[str, Any]:
    """The service with `workers` workers, each running at most `tokens` per session run and holding
    `held` requests of each lockstep round, started after `eviction`: cgroup peak (where one can be made)
    and what stayed cached of the files it maps, PSS and RSS sums, own pages, each worker's VmHWM, and
    whether a worker was killed or replaced."""
    reason = unavailable_reason()
    group: AbstractContextManager[Any] = MemoryCgroup(budget_mb, "memfit-fit") if reason is None else nullcontext()
    env = {
        "WORKERS": str(workers),
        "MAX_TOKENS_PER_RUN": str(tokens),
        "WORKER_CONNECTIONS": str(held),
        "TRUNCATE": "true",
        "PLAN_CHECK": "skip",
        "PENDING_APPROVALS": "true",
    }
    started = time.monotonic()
    with group as cgroup, GunicornService(service_path, env=env, cgroup=cgroup, ready_timeout=300) as service:
        wait_for_every_worker(service, workers, held)
        pids = sorted(service.worker_pids())
        with SamplerProcess(service.master_pid) as sampler:
            statuses = run_lockstep(service, workers * held, bodies)
        alive = sorted(service.worker_pids())
        uncharged = eviction.uncharged_mb(mapped_pages([service.master_pid, *alive], eviction.still_cached))
        worker_hwm = [round(status_mb("VmHWM", pid), 1) for pid in alive]
        figures = cgroup.figures() if cgroup is not None else None
    peak = sampler.result["peak"]
    return {
        "workers": workers,
        "tokens_per_run": tokens,
        "cgroup": None if figures is None else vars(figures),
        "cgroup_unavailable": reason,
        "uncharged_mb": uncharged,
        "pss_peak_mb": peak["total_pss"],
        "own_peak_mb": peak.get("total_own"),
        "rss_sum_peak_mb": peak["total_rss"],
        "master_pss_peak_mb": peak["master_pss"],
        "worker_vmhwm_mb": worker_hwm,
        "workers_replaced": alive != pids,
        "statuses": statuses,
        "samples": sampler.result["samples"],
        "max_sample_gap_ms": sampler.result["max_gap_ms"],
        "seconds": round(time.monotonic() - started, 1),
    }


def planned_fit(run: dict[str, Any], held_mb: float, budget_mb: float) -> bool:
    """No worker killed or replaced, and the counted peak plus each worker's waiting bodies in the budget."""
    oom = bool(run["cgroup"] and run["cgroup"]["oom_kills"])
    return counted_peak(run) + run["workers"] * held_mb <= budget_mb and not oom and not run["workers_replaced"]


@dataclass(frozen=True)
class Activations:
    """What fewer tokens per session run save in each worker: per model, its proven tokens per run and
    the slope of its memory curve (MB per token), measured by the build."""

    models: tuple[tuple[int, float], ...]
    seq_len: int

    @classmethod
    def of(cls, artifacts: list[ApprovedArtifact], seq_len: int) -> Activations:
        models = []
        for artifact in artifacts:
            curve = artifact.manifest["metrics"]["memory_curve"]
            slope = float(curve.get("per_1k_tokens_mb", 0.0)) / 1000
            models.append((int(artifact.manifest["limits"]["max_tokens_per_run"]), slope))
        return cls(tuple(models), seq_len)

    @property
    def full(self) -> int:
        return max(tokens for tokens, _ in self.models)

    def saved_mb(self, tokens: int) -> float:
        """Activation memory one worker saves running at most `tokens` per run."""
        return sum(slope * max(0, proven - tokens) for proven, slope in self.models)

    def fewer(self, tokens: int, mb: float) -> int | None:
        """The most tokens per run below `tokens` predicted to save at least `mb` more per worker."""
        return next((t for t in self.choices() if t < tokens and self.saved_mb(t) - self.saved_mb(tokens) >= mb), None)

    def choices(self) -> list[int]:
        """Tokens per run to try, largest first: whole rows of seq_len, down to one row."""
        return list(range(self.full - self.full % self.seq_len, 0, -self.seq_len)) or [self.seq_len]


@dataclass(frozen=True)
class Savings:
    """What one worker saves running at most `tokens` per run, as the fit measured it: each run's workers'
    mean VmHWM below that of the workers run at full tokens. Between measured token counts it is
    interpolated; below the fewest measured, continued at the build's memory-curve slope. The slope alone
    overstates what a few rows less save between arena steps (MiniLM: 7.1 MB at 3,456 tokens, where it
    says 17.7), and a line through peaks raised by it missed the measured ones by up to 6.6%."""

    activations: Activations
    points: tuple[tuple[int, float], ...]  # (tokens per run, MB saved), most tokens first, from (full, 0)

    @classmethod
    def of(cls, runs: list[dict[str, Any]], activations: Activations) -> Savings:
        measured = [r for r in runs if r.get("worker_vmhwm_mb") and not r.get("workers_replaced")]
        full = [float(np.mean(r["worker_vmhwm_mb"])) for r in measured if r["tokens_per_run"] >= activations.full]
        saved: dict[int, list[float]] = {}
        for run in measured if full else []:
            if run["tokens_per_run"] < activations.full:
                saved.setdefault(run["tokens_per_run"], []).append(full[0] - float(np.mean(run["worker_vmhwm_mb"])))
        points = sorted(((tokens, max(0.0, float(np.mean(mb)))) for tokens, mb in saved.items()), reverse=True)
        return cls(activations, ((activations.full, 0.0), *points))

    def mb(self, tokens: int) -> float:
        if tokens >= self.activations.full:
            return 0.0
        for (upper, upper_mb), (lower, lower_mb) in zip(self.points, self.points[1:], strict=False):
            if lower <= tokens <= upper:
                return upper_mb + (lower_mb - upper_mb) * (upper - tokens) / (upper - lower)
        lowest, lowest_mb = self.points[-1]
        return lowest_mb + self.activations.saved_mb(tokens) - self.activations.saved_mb(lowest)


def line(
    runs: list[dict[str, Any]], savings: Savings, peak: Callable[[dict[str, Any]], float] = counted_peak
) -> tuple[float, float]:
    """(base, per worker at full tokens per run) of the least-squares line through the runs' `peak`s, each
    raised by what the run's smaller micro-batch saved; one run: all of it per worker."""
    adjusted = [peak(r) + r["workers"] * savings.mb(r["tokens_per_run"]) for r in runs]
    if len(runs) < 2:
        return 0.0, adjusted[0]
    slope, intercept = np.polyfit([r["workers"] for r in runs], adjusted, 1)
    return float(intercept), float(slope)


def on_line(run: dict[str, Any], base: float, per_worker: float, savings: Savings) -> float:
    """The line's figure for `run`'s worker count at its tokens per run."""
    return base + run["workers"] * (per_worker - savings.mb(run["tokens_per_run"]))


def predict(
    runs: list[dict[str, Any]],
    fitted: list[dict[str, Any]],
    savings: Savings,
    peak: Callable[[dict[str, Any]], float],
    prefix: str,
) -> tuple[float, float]:
    """The line through `fitted` by `peak`; each of `runs` gets its figure on it (`<prefix>line_mb`) and
    that figure's error against its own peak (`<prefix>line_error`)."""
    base, per_worker = line(fitted, savings, peak)
    for run in runs:
        run[f"{prefix}line_mb"] = round(on_line(run, base, per_worker, savings), 1)
        run[f"{prefix}line_error"] = round(run[f"{prefix}line_mb"] / peak(run) - 1, 4)
    return base, per_worker


def tokens_for(
    workers: int, base: float, per_worker: float, held: float, savings: Savings, budget: float
) -> int | None:
    """The most tokens per run at which `workers` workers are predicted to fit; None when none does."""
    for tokens in savings.activations.choices():
        if base + workers * (per_worker - savings.mb(tokens) + held) <= budget:
            return tokens
    return None


def after_overshoot(run: dict[str, Any], held: float, activations: Activations, budget: float) -> int | None:
    """Tokens per run for a count measured over the budget: predicted to save OVERSHOOT_FACTOR times the
    overshoot per worker, at the build's slope. The arena grows in steps, so a few rows less may save
    nothing: the line alone can predict the same overshoot again."""
    over = counted_peak(run) + run["workers"] * held - budget
    return activations.fewer(int(run["tokens_per_run"]), OVERSHOOT_FACTOR * over / run["workers"])


def fit_key(artifacts: list[ApprovedArtifact], configs: LoadedConfigs) -> str:
    """What decides a fit: the files every worker loads, how each model runs, and the service config
    (but where the artifacts live: a moved artifacts folder holds the same files)."""
    models = [{key: a.manifest[key] for key in ("files", "session_options", "limits", "runtime")} for a in artifacts]
    service = configs.service.model_dump(exclude={"artifacts_dir"})
    return cache_key(version=FIT_VERSION, service=service, models=models)


def measure_service(configs: LoadedConfigs, cache: ResultCache) -> dict[str, Any]:
    """The fit of the service's pending approvals: from `cache` when these exact files and settings were
    measured before (marked `reused`), else measured and cached."""
    root = configs.artifacts_dir
    artifacts = [load_approved(root / model.name, pending=True) for model, _ in configs.models]
    approvals = {a.model: read_json(approval_pointer(root / a.model, pending=True))["sha256"] for a in artifacts}
    key = fit_key(artifacts, configs)
    found = cache.get("service-fit", key)
    reused = found is not None
    if found is None:
        started = time.monotonic()
        found = measure_fit(artifacts, configs)
        found["seconds"] = round(time.monotonic() - started, 1)
        cache.put("service-fit", key, found)
    return {**found, "approvals": approvals, "reused": reused}


def measure_fit(artifacts: list[ApprovedArtifact], configs: LoadedConfigs, repeats: int = 3) -> dict[str, Any]:
    service = configs.service
    budget = service.budget_mb
    one_process = measure_one_process(artifacts, configs, repeats)
    bodies = load_bodies(artifacts, configs)
    activations = Activations.of(artifacts, service.limits.max_seq_len)
    held = min(HELD_PER_WORKER, service.threads)  # THREADS=1 reads one request at a time
    held_mb = (service.threads - held) * service.limits.max_body_bytes / MB
    runs: list[dict[str, Any]] = []
    files = list(service_files(PROJECT_ROOT, configs.artifacts_dir))
    for workers in range(1, service.fit_max_workers + 1):
        # One worker runs at full tokens; more, at the most tokens the runs so far predict to fit. A run
        # over the budget joins the line, and the count is measured again at fewer tokens (at most
        # FIT_TRIES runs per count).
        tried: set[int] = set()
        fitted = False
        while not fitted and len(tried) < FIT_TRIES:
            savings = Savings.of(runs, activations)
            base, per_worker = line(runs, savings) if runs else (0.0, 0.0)
            tokens = activations.full if not runs else tokens_for(workers, base, per_worker, held_mb, savings, budget)
            if tokens is None and workers == 2 and not tried:
                # One count cannot tell the pages workers share (libraries, mapped weights) from each one's
                # own: the line through it counts them all per worker (mpnet: 2 × 266 MB predicted, so two
                # workers went unmeasured). Two workers are measured at the fewest tokens instead.
                tokens = activations.choices()[-1]
            if tried and tokens is not None:
                tokens = min(tokens, after_overshoot(runs[-1], held_mb, activations, budget) or 0) or None
            if tokens is None or tokens in tried:
                break
            tried.add(tokens)
            label = f"{workers} worker(s) at {tokens} tokens per run, {len(bodies)} bodies {held} at a time each"
            with step(f"service fit: {label}"):
                eviction = evict(files)
                runs.append(measure_workers(configs.service_path, workers, tokens, budget, bodies, held, eviction))
            fitted = planned_fit(runs[-1], held_mb, budget)
        if not fitted:
            break
    fitting = [r for r in runs if planned_fit(r, held_mb, budget)]
    undisturbed = [r for r in runs if not r["workers_replaced"] and not (r["cgroup"] and r["cgroup"]["oom_kills"])]
    savings = Savings.of(runs, activations)
    base, per_worker = predict(runs, undisturbed or runs[:1], savings, counted_peak, "")
    grouped = [r for r in runs if r["cgroup"]]
    cgroup_line = None
    if grouped:
        through = [r for r in undisturbed if r["cgroup"]] or grouped[:1]
        cgroup_line = [round(mb, 1) for mb in predict(grouped, through, savings, container_peak, "cgroup_")]
    own_line = [round(mb, 1) for mb in predict(runs, undisturbed or runs[:1], savings, own_peak, "own_")]
    for run in runs:
        run["planned_mb"] = round(counted_peak(run) + run["workers"] * held_mb, 1)
        run["fits"] = run in fitting
    worker_peak = max([one_process["worker_peak_mb"], *(hwm for r in runs for hwm in r["worker_vmhwm_mb"])])
    models = one_process.pop("models")
    first = runs[0]
    own = "own pages" if first.get("own_peak_mb") else "pss"
    return {
        "budget_mb": budget,
        "counted_by": f"max(cgroup, {own})" if first["cgroup"] else own,
        "base_mb": round(base, 1),
        "per_worker_mb": round(per_worker, 1),
        "cgroup_line_mb": cgroup_line,  # [base, per worker] through the container's peaks; None without a cgroup
        "own_line_mb": own_line,  # [base, per worker] through the own pages (a container's PSS sum)
        "held_requests": held,  # per worker, in every run
        "held_bodies_mb": round(held_mb, 1),
        "max_workers_measured": max((r["workers"] for r in fitting), default=0),
        "runs": runs,
        "worker_peak_mb": worker_peak,
        "total_mb": round(counted_peak(first) + held_mb, 1),
        "fits": planned_fit(first, held_mb, budget),
        "one_process": one_process,
        "models": models,
    }


def measure_one_process(artifacts: list[ApprovedArtifact], configs: LoadedConfigs, repeats: int) -> dict[str, Any]:
    """Every model loaded together in one fresh process at its worst case and hostile bodies, plus an
    idle gunicorn master's RSS: the first estimate, and how the worker's memory divides by model."""
    service = configs.service
    seq_len = service.limits.max_seq_len
    probe_models = [
        {
            "folder": str(a.folder),
            "session_options": a.manifest["session_options"],
            "batch": a.manifest["limits"]["max_tokens_per_run"] // seq_len,
        }
        for a in artifacts
    ]
    with step(f"service fit: {len(artifacts)} model(s) together in one process"):
        result = run_probe(probe_models, service, repeats=repeats, request_path=True)
        master = idle_master_mb()
    floor = result["rss_after_imports_mb"]
    previous = floor
    models = []
    for artifact, loaded in zip(artifacts, result["rss_after_each_load_mb"], strict=True):
        metrics = artifact.manifest["metrics"]
        models.append(
            {
                "model": artifact.model,
                "variant": artifact.variant_id,
                "tokens_per_run": artifact.manifest["limits"]["max_tokens_per_run"],
                "weights_mb": round(loaded - previous, 1),
                "activation_peak_mb": round(metrics["model_run_peak_mb"] - metrics["rss_after_load_mb"], 1),
                "alone_peak_mb": metrics["peak_rss_mb"],
            }
        )
        previous = loaded
    worker = result["vmhwm_mb"]
    return {
        "master_rss_mb": round(master, 1),
        "runtime_floor_mb": floor,
        "worker_peak_mb": worker,
        "rss_total_mb": round(worker + master, 1),
        "request_path": {**result["request_path"], "peak_before_mb": result["vmhwm_before_request_path_mb"]},
        "weights": result["weights"],
        "models": models,
    }


def write_service_fit(fit: dict[str, Any], artifacts_root: Path) -> None:
    write_bytes_atomic(artifacts_root / SERVICE_FIT_FILE, json_bytes(fit))
