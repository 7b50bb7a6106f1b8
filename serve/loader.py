"""Open an approved artifact as a runtime: verify checksums, then create the session the manifest proves."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.artifacts import ArtifactError, dropped_meanwhile, load_approved
from serve.config import ServiceConfig, SessionSettings
from serve.cpu import check_int8_kernels
from serve.onnx_refs import check_external_data
from serve.prepacked import PREPACKED_MODEL
from serve.runtime import MODEL_FILE, ModelRuntime

log = logging.getLogger("memfit.serve")


@dataclass(frozen=True)
class ServedModel:
    name: str
    runtime: ModelRuntime
    variant: str
    manifest: dict[str, Any]

    @property
    def task(self) -> str:
        return self.runtime.spec.task


def session_settings(approved: dict[str, Any], intra_op_threads: int | None) -> SessionSettings:
    """The approved session options, with at most `intra_op_threads` threads: fewer threads never need
    more memory, and W workers on C cores run fastest with C ÷ W each."""
    settings = SessionSettings.model_validate(approved)
    proven = settings.intra_op_num_threads or len(os.sched_getaffinity(0))  # 0: ONNX Runtime's default, the cores
    if intra_op_threads is None or intra_op_threads >= proven:
        return settings
    return settings.model_copy(update={"intra_op_num_threads": intra_op_threads})


def open_approved(model_dir: Path, service: ServiceConfig) -> ServedModel:
    """Refuses (ArtifactError) an artifact that does not verify, whose int8 outputs this CPU cannot
    reproduce, or a service that accepts more than its approval proves: longer inputs, larger bodies,
    more characters, more threads."""
    artifact = load_approved(model_dir, pending=service.pending_approvals)
    check_int8_kernels(artifact.manifest, model_dir.name)
    for model_file in (MODEL_FILE, PREPACKED_MODEL):
        if model_file in artifact.manifest["files"]:
            check_external_data(artifact.folder / model_file, allowed=set(artifact.manifest["files"]))
    proven = artifact.manifest["limits"]
    limits = service.limits
    # A container is charged for the file pages its processes read, mapped or not. Loading reads more than
    # the session keeps mapped (ONNX Runtime reads all 219 MB of mpnet's prepacked file and maps 139; the
    # checks read the portable model), so the rest is dropped, while the session loads and after. The
    # kernel keeps a large folio whole while any of its pages is mapped, which is why the build lays that
    # file out by use (pipeline/prepack.py): then 138.5 MB stay, where ONNX Runtime's own layout kept 200.4.
    with dropped_meanwhile([artifact.folder / name for name in artifact.manifest["files"]]):
        runtime = ModelRuntime(
            artifact.folder,
            session_settings(artifact.manifest["session_options"], service.intra_op_threads),
            max_seq_len=limits.max_seq_len,
            max_tokens_per_run=min(int(proven["max_tokens_per_run"]), limits.max_tokens_per_run or 1 << 62),
            max_batch=int(proven["max_batch"]),
            max_input_chars=limits.max_input_chars,
            max_request_chars=limits.max_request_chars,
            shared_weights=service.shared_weights,
        )
    log.info("model %s: %s (%s)", model_dir.name, runtime.weights.path.name, runtime.weights.reason)
    accepted = {
        "max_batch": limits.max_batch,
        "max_seq_len": limits.max_seq_len,
        "max_body_bytes": limits.max_body_bytes,
        "max_input_chars": runtime.max_input_chars,
        "max_request_chars": runtime.max_request_chars,
        "threads": service.threads,
    }
    for name, value in accepted.items():
        if name not in proven:
            raise ArtifactError(
                f"{model_dir.name}: its approval does not prove {name} (built by an older memfit); "
                "re-run `make optimize`"
            )
        if value > proven[name]:
            raise ArtifactError(
                f"{model_dir.name}: {name} {value:,} exceeds the {proven[name]:,} its approval proves; "
                "re-run `make optimize` with the new limits"
            )
    return ServedModel(model_dir.name, runtime, artifact.variant_id, artifact.manifest)
