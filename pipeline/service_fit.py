"""Whole-service fit: every approved model of a service loaded together in one fresh process, each
run at its own worst-case micro-batch and sent its hostile bodies, plus an idle gunicorn master. Fails
when the total exceeds the budget; the measured worker peak is recorded for the planner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.atomic import json_bytes, write_bytes_atomic
from pipeline.config import LoadedConfigs
from pipeline.measure import run_probe
from pipeline.progress import step
from serve.artifacts import APPROVED_FILE, load_approved, read_json
from serve.planner import SERVICE_FIT_FILE, idle_master_mb


def measure_service(configs: LoadedConfigs, repeats: int = 3) -> dict[str, Any]:
    service, root = configs.service, configs.artifacts_dir
    seq_len = service.limits.max_seq_len
    artifacts = [load_approved(root / model.name) for model, _ in configs.models]
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
    request_path = {**result["request_path"], "peak_before_mb": result["vmhwm_before_request_path_mb"]}
    total = round(worker + master, 1)
    return {
        "budget_mb": service.budget_mb,
        "master_mb": round(master, 1),
        "runtime_floor_mb": floor,
        "worker_peak_mb": worker,
        "request_path": request_path,
        "total_mb": total,
        "fits": total <= service.budget_mb,
        "models": models,
        "approvals": {a.model: read_json(root / a.model / APPROVED_FILE)["sha256"] for a in artifacts},
    }


def write_service_fit(fit: dict[str, Any], artifacts_root: Path) -> None:
    write_bytes_atomic(artifacts_root / SERVICE_FIT_FILE, json_bytes(fit))
