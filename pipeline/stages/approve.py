"""Fail-closed approval: publish the candidate pipeline/stages/prove.py chose, atomically.

The variant folder is written to a temp dir and renamed into place; only then is a pending pointer
written beside approved.json. `memfit optimize` measures the whole service on the pending approvals and
only then replaces each approved.json with its pending pointer (atomically); if any model of the service
passes no gate or the service does not fit, every pending pointer is withdrawn and the previous
approvals are left untouched.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_dir, json_bytes, remove_leftovers, write_bytes_atomic
from pipeline.config import Gates
from pipeline.provenance import machine, versions
from pipeline.state import BuildContext, BuildState, Candidate, Evaluation, Measurement, SourceModel, Verdict
from serve.artifacts import (
    APPROVED_FILE,
    MANIFEST_FILE,
    PENDING_FILE,
    RUNTIME_FILE,
    ArtifactError,
    load_approved,
    read_json,
    sha256_bytes,
    sha256_file,
)
from serve.onnx_refs import check_external_data
from serve.prepacked import PREPACKED_MODEL, PREPACKED_STAMP, prepacked_files
from serve.runtime import MODEL_FILE, TOKENIZER_FILE

ARTIFACT_FILES = (MODEL_FILE, TOKENIZER_FILE, RUNTIME_FILE)
KEEP_VARIANTS = 2  # the new approval and the one it replaced (for rollback)


def build_manifest(
    context: BuildContext,
    source: SourceModel,
    candidate: Candidate,
    evaluation: Evaluation,
    measurement: Measurement,
    files: dict[str, Any],
    gates: Gates,
) -> dict[str, Any]:
    limits = context.service.limits
    proven = measurement.request_path
    if proven is None:
        raise ValueError(f"{candidate.variant}: approved without a request-path proof")
    metrics: dict[str, Any] = {
        "peak_rss_mb": measurement.peak_rss_mb,
        "model_run_peak_mb": measurement.model_run_peak_mb,
        "request_path": proven,
        "ru_maxrss_mb": measurement.ru_maxrss_mb,
        "rss_after_load_mb": measurement.rss_after_load_mb,
        "rss_after_imports_mb": measurement.rss_after_imports_mb,
        "measured_at": {"batch": measurement.batch, "seq_len": measurement.seq_len},
        "worst_case_peak_mb": measurement.worst_case_peak_mb,
        "memory_curve": {
            **(measurement.curve.to_json() if measurement.curve else {}),
            "predicted_peak_mb": measurement.predicted_peak_mb,
            "prediction_error": round(measurement.prediction_error or 0.0, 4),
        },
        "session_variant": measurement.session_variant,
        "session_trials_mb": measurement.session_trials,
        "session_timings": measurement.session_timings,
        "micro_batch_timings": measurement.micro_batch_timings,
        "accuracy": evaluation.accuracy,
        "latency_ms": evaluation.latency_ms,
        "throughput_per_s": evaluation.throughput,
        "file_mb": candidate.file_mb,
    }
    if evaluation.cosine is not None:
        metrics["cosine"] = evaluation.cosine
        metrics["neighbours"] = evaluation.neighbours
    if evaluation.agreement is not None:
        metrics["agreement"] = evaluation.agreement
    return {
        "model": context.model.name,
        "task": context.model.task,
        "source": source.source,
        "variant": {"name": candidate.variant, **candidate.settings},
        "files": files,
        "runtime": read_json(candidate.folder / RUNTIME_FILE),
        "session_options": measurement.session_options,
        # The platform the shared (prepacked) weights were built for; elsewhere model.onnx loads.
        "prepacked": read_json(candidate.folder / PREPACKED_STAMP) if PREPACKED_STAMP in files else None,
        "limits": {
            "max_batch": limits.max_batch,
            "max_seq_len": limits.max_seq_len,
            "max_tokens_per_run": measurement.max_tokens_per_run,
            "max_body_bytes": limits.max_body_bytes,
            "max_input_chars": proven["max_input_chars"],
            "max_request_chars": proven["max_request_chars"],
            "threads": context.service.threads,
        },
        "budget_mb": context.service.budget_mb,
        "budget_share_mb": context.share_mb,
        "metrics": metrics,
        "gates": gates.model_dump(),
        "versions": versions(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }


def approval_change(previous: dict[str, Any] | None, chosen: str, verdicts: tuple[Verdict, ...]) -> str | None:
    """Why the approval moves from the previous manifest's variant to `chosen`, in one line; None when
    it does not move (or there was none): the gates, the ranking, the candidate list, and the versions."""
    if previous is None or previous["variant"]["name"] == chosen:
        return None
    before = previous["variant"]["name"]
    verdict = next((v for v in verdicts if v.variant == before), None)
    if verdict is None:
        cause = f"{before} is no longer a configured candidate"
    elif verdict.failures:
        cause = f"{before} now fails the gates ({'; '.join(verdict.failures)})"
    else:
        cause = f"the ranking: {before} {verdict.note}"
    moved = {k: (v, versions().get(k)) for k, v in previous.get("versions", {}).items() if versions().get(k) != v}
    if moved:
        cause += "; versions changed: " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in sorted(moved.items()))
    return f"approval changes from {before} to {chosen}: {cause}"


def publish(model_dir: Path, candidate: Candidate, manifest_for: Callable[[dict[str, Any]], dict[str, Any]]) -> Path:
    """Write the variant folder atomically, then point approved.json at it; returns the new folder."""
    remove_leftovers(model_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    final = model_dir / f"{candidate.variant}-{stamp}"
    with atomic_dir(final) as tmp:
        files = {}
        external = check_external_data(candidate.folder / MODEL_FILE)
        for name in (*ARTIFACT_FILES, *external, *prepacked_files(candidate.folder)):
            shutil.copy2(candidate.folder / name, tmp / name)
            files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        if PREPACKED_MODEL in files:
            check_external_data(tmp / PREPACKED_MODEL, allowed=set(files))
        (tmp / MANIFEST_FILE).write_bytes(json_bytes(manifest_for(files)))
    manifest_sha = sha256_bytes((final / MANIFEST_FILE).read_bytes())
    pointer = {"variant": final.name, "manifest": f"{final.name}/{MANIFEST_FILE}", "sha256": manifest_sha}
    write_bytes_atomic(model_dir / PENDING_FILE, json_bytes(pointer))
    return final


def settle(model_dir: Path, publish_pending: bool) -> None:
    """Publish a pending approval (atomically replace approved.json with it), or withdraw it; then prune."""
    pending = model_dir / PENDING_FILE
    if pending.is_file():
        if publish_pending:
            os.replace(pending, model_dir / APPROVED_FILE)
        else:
            pending.unlink()
    if (model_dir / APPROVED_FILE).is_file():
        prune(model_dir, keep=load_approved(model_dir, verify=False).folder)


def prune(model_dir: Path, keep: Path) -> None:
    """Remove old variant folders, keeping the newest KEEP_VARIANTS (the approved one always)."""
    variants = sorted(
        (p for p in model_dir.iterdir() if p.is_dir() and (p / MANIFEST_FILE).exists()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in variants[KEEP_VARIANTS:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class ApproveStage:
    gates: Gates
    name: str = "approve"

    def run(self, context: BuildContext, state: BuildState) -> BuildState:
        source: SourceModel = state.require("source")
        evaluations: dict[str, Evaluation] = state.require("evaluations")
        measurements: dict[str, Measurement] = state.require("measurements")
        verdicts: tuple[Verdict, ...] = state.require("verdicts")
        chosen = next((v.variant for v in verdicts if v.chosen), None)
        if chosen is None:
            return state
        candidate = next(c for c in state.candidates if c.variant == chosen)
        try:
            previous: dict[str, Any] | None = load_approved(context.artifacts_dir, verify=False).manifest
        except ArtifactError:
            previous = None
        change = approval_change(previous, chosen, verdicts)
        if change is not None:
            print(f"memfit: {context.model.name}: {change}", file=sys.stderr)

        def manifest_for(files: dict[str, Any]) -> dict[str, Any]:
            manifest = build_manifest(
                context, source, candidate, evaluations[chosen], measurements[chosen], files, self.gates
            )
            return {**manifest, "approval_change": change}

        folder = publish(context.artifacts_dir, candidate, manifest_for)
        try:
            load_approved(context.artifacts_dir, pending=True)
        except ArtifactError as exc:  # pragma: no cover - would mean the write itself is broken
            raise RuntimeError(f"freshly approved artifact does not verify: {exc}") from exc
        return replace(state, approved=folder)
