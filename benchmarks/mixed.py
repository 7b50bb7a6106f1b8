"""The service under a mixed load in a memory cgroup limited to its budget, the way a container host counts
it. For each W (default: every count the plan offers), the shipped service with WORKERS=W; 4 clients send
40 requests of 32 of the model's evaluation texts, then 400 requests of 1..max_batch texts, every 10th the
worst case (max_batch × max_seq_len). Per W: the cgroup's peak, failcnt and OOM kills; what it held at the
end (anonymous memory, page cache, the mapped and the inactive part of that cache); the own-pages, PSS and
RSS sums' peaks (a separate sampler); requests/s; beside them what the plan predicts. The cgroup's peak is
also split at the moment every worker has loaded: the load's (which reads the weights' files through the
page cache) and the serving's (which restarts from what the cgroup then holds).

`--cold` first evicts from the page cache every file the service may read (what is on the import path,
the repository, the artifacts, the files this process maps: `service_files`), as in a container that has
just started:
the cgroup is then charged for every file page the service reads, but for pages another process maps
(which cannot be dropped): what stays cached of the files the service maps is recorded as `uncharged_mb`.
Without it, a page another process read earlier stays charged where it was first read.

Usage: python -m benchmarks.mixed [--service configs/service.yaml] [--workers 1 2] [--cold] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.record import write_record
from pipeline.config import ModelConfig, load_config
from pipeline.data import load_dataset
from pipeline.memory.cgroup import Eviction, MemoryCgroup, evict, service_files
from pipeline.memory.harness import GunicornService, mapped_pages, request_mix
from pipeline.memory.sampler import SamplerProcess
from pipeline.sources import data_path
from serve.config import ServiceConfig, load_service_config, model_names, resolve
from serve.planner import worker_figures

CLIENTS = 4
REVIEW_REQUESTS = 40
MIXED_REQUESTS = 400
REPO = Path(__file__).resolve().parent.parent


def evaluation_texts(config: ServiceConfig, path: Path) -> list[str]:
    """The first model's evaluation texts (real ones: the build's own data)."""
    model_path = resolve(path, config.models[0])
    model = load_config(model_path, ModelConfig)
    return load_dataset(data_path(model.eval.data, model_path), model.eval, model_path).test.texts


def requests(config: ServiceConfig, path: Path) -> list[list[str]]:
    limits = config.limits
    texts = evaluation_texts(config, path)
    batches = [texts[i : i + limits.max_batch] for i in range(0, len(texts), limits.max_batch)]
    reviews = [batches[i % len(batches)] for i in range(REVIEW_REQUESTS)]
    return reviews + request_mix(MIXED_REQUESTS, limits.max_batch, limits.max_seq_len, worst_every=10)


def requests_apart(config: ServiceConfig, path: Path) -> list[list[str]]:
    """`requests`, made in a child process: reading a model config imports the build's libraries
    (onnxruntime among them), and a page this process maps can neither be evicted nor charged to the
    container."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(requests, config, path).result()


def run(config: ServiceConfig, path: Path, workers: int, mix: list[list[str]], cold: bool) -> dict[str, Any]:
    artifacts = resolve(path, config.artifacts_dir)
    eviction = evict(service_files(REPO, artifacts)) if cold else Eviction()
    with (
        MemoryCgroup(config.budget_mb, "memfit-mixed") as cgroup,
        GunicornService(path, env={"WORKERS": str(workers)}, cgroup=cgroup, ready_timeout=300) as service,
    ):
        service.wait_for_workers(workers)
        load_peak = cgroup.restart_peak()
        with SamplerProcess(service.master_pid) as sampler:
            started = time.perf_counter()
            with ThreadPoolExecutor(CLIENTS) as pool:
                codes = list(
                    pool.map(lambda texts: service.request("POST", "/api/embed", {"inputs": texts}).status, mix)
                )
            seconds = time.perf_counter() - started
        pids = [service.master_pid, *service.worker_pids()]
        uncharged = eviction.uncharged_mb(mapped_pages(pids, eviction.still_cached))
        held = cgroup.held_mb()
        measured = cgroup.figures()
    peak = sampler.result["peak"]
    return {
        "workers": workers,
        "evicted_files": eviction.files,
        "uncharged_mb": uncharged if cold else None,
        "cgroup": vars(measured) | {"peak_mb": max(load_peak, measured.peak_mb)},
        "cgroup_load_peak_mb": load_peak,
        "cgroup_serving_peak_mb": measured.peak_mb,
        "cgroup_held_at_end_mb": held,
        "own_peak_mb": peak.get("total_own"),
        "pss_peak_mb": peak["total_pss"],
        "rss_sum_peak_mb": peak["total_rss"],
        "non_200": sum(code != 200 for code in codes),
        "requests": len(codes),
        "requests_per_s": round(len(codes) / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--service", type=Path, default=Path("configs/service.yaml"))
    parser.add_argument("--workers", type=int, nargs="*", help="the counts to run (default: every one the plan offers)")
    parser.add_argument("--cold", action="store_true", help="evict the service's files from the page cache first")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    config, path = load_service_config(args.service)
    figures, approvals = worker_figures(config, path)
    counts = args.workers or range(1, figures.most_workers(config.budget_mb, 0.0) + 1)
    mix = requests_apart(config, path)
    rows = []
    for workers in counts:
        predicted, predicted_cgroup, predicted_own = figures.predicted_mb(workers)
        row = {
            **run(config, path, workers, mix, args.cold),
            "predicted_mb": predicted,
            "predicted_cgroup_mb": predicted_cgroup,
            "predicted_own_mb": predicted_own,
            "planned_mb": round(figures.needed_mb(workers, 0.0)[0], 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_record(
        args.out,
        rows,
        service=str(args.service),
        models=model_names(config, path),
        approvals=approvals,
        cold=args.cold,
        clients=CLIENTS,
    )


if __name__ == "__main__":
    main()
