"""`make bench`: memfit against what users run today, per model, in one run on one machine.

Every contender is served by one gunicorn worker on 127.0.0.1 and driven by the same requests. They
run interleaved (A B C D E, then again) for several rounds; each figure is reported as the median and
min–max over rounds, and as a ratio to memfit measured in the same run (absolute times on a shared
machine drift; ratios hold). Accuracy and fidelity come from the first round's vectors: a logistic
probe fit on torch-fp32 train vectors scores every contender's test vectors.

Usage: python -m benchmarks.run [--services configs/service.yaml configs/service-mpnet.yaml] [--rounds 3]
(every model of each service, each served alone from that service's approval)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.contenders import Contender, contenders
from benchmarks.report import write_results
from pipeline.config import LoadedConfigs
from pipeline.data import load_dataset
from pipeline.fidelity import FidelityReference
from pipeline.memory.harness import GunicornService, MemorySampler, request_mix
from pipeline.memory.probe import PROJECT_ROOT
from pipeline.memory.sampler import SamplerProcess
from pipeline.provenance import versions
from pipeline.sources import data_path
from pipeline.stages.evaluate import fit_probe
from serve.artifacts import load_approved
from serve.memory import status_mb
from serve.planner import idle_master_mb

SINGLE_REQUESTS = 40  # one review each
BATCH_REQUESTS = 10  # 32 reviews each
LOAD_REQUESTS = 20  # the concurrent mix: 1..32 texts of up to 64 words, every 5th the largest accepted
LOAD_CONCURRENCY = 4
PROBE_TEXTS = 1000  # train texts for the probe, and as many test texts
CHUNK = 32
VERSIONED = ("torch", "transformers", "optimum", "optimum-onnx", "sentence-transformers", "onnxruntime", "flask")


@dataclass(frozen=True)
class Workload:
    single: list[list[str]]
    batch: list[list[str]]
    load: list[list[str]]
    train: list[str]
    train_labels: np.ndarray
    test: list[str]
    test_labels: np.ndarray


def percentiles(samples: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(samples, 50)), 2), "p95": round(float(np.percentile(samples, 95)), 2)}


def timed(service: GunicornService, requests: list[list[str]]) -> list[float]:
    latencies = []
    for texts in requests:
        reply = service.request("POST", "/api/embed", {"inputs": texts}, timeout=600)
        if reply.status != 200:
            raise RuntimeError(f"answered {reply.status}: {str(reply.body)[:300]}")
        latencies.append(reply.seconds * 1000)
    return latencies


def embed(service: GunicornService, texts: list[str]) -> np.ndarray:
    vectors = []
    for start in range(0, len(texts), CHUNK):
        reply = service.request("POST", "/api/embed", {"inputs": texts[start : start + CHUNK]}, timeout=600)
        if reply.status != 200:
            raise RuntimeError(f"answered {reply.status}: {str(reply.body)[:300]}")
        vectors.append(np.asarray(reply.body["embeddings"], dtype=np.float32))
    return np.concatenate(vectors)


def concurrent_load(port: int, requests: list[list[str]]) -> dict[str, Any]:
    """requests/s with LOAD_CONCURRENCY clients in flight, from a second process."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(requests, handle)
    command = [sys.executable, "-m", "benchmarks.load", str(port), handle.name, str(LOAD_CONCURRENCY)]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    Path(handle.name).unlink()
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["failures"]:
        raise RuntimeError(f"load answered {result['failures'][:5]}")
    return result


def measure(contender: Contender, workload: Workload, service_config: Path, outputs: bool) -> dict[str, Any]:
    """One round of one contender: cold start, idle and peak memory, latency, throughput (and vectors)."""
    service = GunicornService(
        service_config, env=contender.env, app=contender.app, config_file=contender.config_file, ready_timeout=600
    )
    with service:
        time.sleep(1.0)  # let the worker settle after its first ready answer
        idle = MemorySampler(service.master_pid).sample()
        with SamplerProcess(service.master_pid) as sampler:
            single = timed(service, workload.single)
            batch = timed(service, workload.batch)
            load = concurrent_load(service.port, workload.load)
            vectors = (embed(service, workload.train), embed(service, workload.test)) if outputs else None
        sampled = sampler.result
        worker_hwm = status_mb("VmHWM", service.worker_pids()[0])
    figures = {
        "cold_start_s": round(service.cold_start_s or 0.0, 2),
        **{f"idle_{key}_mb": round(value, 1) for key, value in idle.items()},
        **{f"peak_{key}_mb": value for key, value in sampled["peak"].items()},
        "worker_vmhwm_mb": round(worker_hwm, 1),
        "single_p50_ms": percentiles(single)["p50"],
        "single_p95_ms": percentiles(single)["p95"],
        "batch32_p50_ms": percentiles(batch)["p50"],
        "batch32_p95_ms": percentiles(batch)["p95"],
        "requests_per_s": load["requests_per_s"],
        "max_sample_gap_ms": sampled["max_gap_ms"],
    }
    return {"figures": figures, "vectors": vectors}


def quality(vectors: dict[str, tuple[np.ndarray, np.ndarray]], workload: Workload) -> dict[str, dict[str, float]]:
    """Probe accuracy (head fit on torch-fp32 train vectors) and fidelity to torch-fp32 on the test texts."""
    train, test = vectors["torch-fp32"]
    probe = fit_probe(train, workload.train_labels, seed=0)
    reference = FidelityReference(test, embedding=True)
    scores = {}
    for name, (_, outputs) in vectors.items():
        fidelity = reference.compare(outputs)
        scores[name] = {
            "probe_accuracy": round(float((probe.predict(outputs) == workload.test_labels).mean()), 4),
            "cosine_mean": fidelity.cosine_mean or 0.0,
            "cosine_min": fidelity.cosine_min or 0.0,
            "overlap_at_10": fidelity.overlap_at_10 or 0.0,
        }
    return scores


def physical_floor(weights_mb: float) -> dict[str, float]:
    """A bare process importing only the runtime + the approved weight bytes + an idle gunicorn master."""
    code = "import onnxruntime, tokenizers, numpy; from serve.memory import status_mb; print(status_mb())"
    bare = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    master = idle_master_mb()
    return {
        "runtime_imports_mb": round(bare, 1),
        "weights_mb": round(weights_mb, 1),
        "gunicorn_master_mb": round(master, 1),
        "floor_mb": round(bare + weights_mb + master, 1),
    }


def memfit_service(configs: LoadedConfigs, model_path: Path, folder: Path) -> Path:
    """A service config hosting this one model from the approvals of the benchmarked service."""
    service = configs.service
    data = {
        "budget_mb": service.budget_mb,
        "headroom_mb": service.headroom_mb,
        "models": [str(model_path.resolve())],
        "limits": service.limits.model_dump(),
        "artifacts_dir": str(configs.artifacts_dir.resolve()),
    }
    path = folder / "memfit-service.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def bench_model(configs: LoadedConfigs, name: str, rounds: int, work: Path) -> dict[str, Any]:
    model, model_path = next((m, p) for m, p in configs.models if m.name == name)
    limits = configs.service.limits
    artifact = load_approved(configs.artifacts_dir / name)
    source = Path(artifact.manifest["source"]["path"])
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(data_path(model.eval.data, model_path), model.eval, model_path)
    texts = dataset.test.texts
    workload = Workload(
        single=[[text] for text in texts[:SINGLE_REQUESTS]],
        batch=[texts[i * 32 : (i + 1) * 32] for i in range(BATCH_REQUESTS)],
        load=request_mix(LOAD_REQUESTS, limits.max_batch, limits.max_seq_len, worst_every=5, max_words=64),
        train=dataset.train.texts[:PROBE_TEXTS],
        train_labels=dataset.train.label_ids[:PROBE_TEXTS],
        test=texts[:PROBE_TEXTS],
        test_labels=dataset.test.label_ids[:PROBE_TEXTS],
    )
    service_config = memfit_service(configs, model_path, folder)
    print(f"bench {name}: preparing contenders", file=sys.stderr, flush=True)
    entries = contenders(source, folder, service_config, limits.max_seq_len)
    per_round: dict[str, list[dict[str, float]]] = {c.name: [] for c in entries}
    vectors = {}
    for round_index in range(rounds):
        for contender in entries:  # interleaved: every contender once per round
            print(f"bench {name}: round {round_index + 1}/{rounds}: {contender.name}", file=sys.stderr, flush=True)
            result = measure(contender, workload, service_config, outputs=round_index == 0)
            per_round[contender.name].append(result["figures"])
            if result["vectors"] is not None:
                vectors[contender.name] = result["vectors"]
    scores = quality(vectors, workload)
    model_file = artifact.folder / "model.onnx"
    return {
        "model": name,
        "source": str(source),
        "memfit_variant": artifact.variant_id,
        "max_seq_len": limits.max_seq_len,
        "contenders": {
            c.name: {"label": c.label, "rounds": per_round[c.name], "quality": scores[c.name]} for c in entries
        },
        "physical_floor": physical_floor(model_file.stat().st_size / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", nargs="+", default=["configs/service.yaml", "configs/service-mpnet.yaml"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work", default="build/bench")
    args = parser.parse_args()
    services = [LoadedConfigs(path) for path in args.services]
    started = datetime.now(UTC)
    models = [
        bench_model(configs, model.name, args.rounds, Path(args.work))
        for configs in services
        for model, _ in configs.models
    ]
    results = {
        "created_at": started.isoformat(timespec="seconds"),
        "minutes": round((datetime.now(UTC) - started).total_seconds() / 60, 1),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "cpu": next(
                (
                    line.split(":", 1)[1].strip()
                    for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")
                ),
                "unknown",
            ),
        },
        "versions": versions(VERSIONED),
        "budget_mb": services[0].service.budget_mb,
        "rounds": args.rounds,
        "workload": {
            "single_requests": SINGLE_REQUESTS,
            "batch32_requests": BATCH_REQUESTS,
            "load_requests": LOAD_REQUESTS,
            "load_concurrency": LOAD_CONCURRENCY,
            "probe_texts": PROBE_TEXTS,
        },
        "models": models,
    }
    paths = write_results(results, Path(args.out))
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
