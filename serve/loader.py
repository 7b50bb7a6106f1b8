"""Open an approved artifact as a runtime: verify checksums, then create the session the manifest proves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from serve.artifacts import ApprovedArtifact, ArtifactError, load_approved
from serve.config import Limits
from serve.onnx_refs import check_external_data
from serve.runtime import MODEL_FILE, ModelRuntime, SessionSettings


@dataclass(frozen=True)
class ServedModel:
    name: str
    artifact: ApprovedArtifact
    runtime: ModelRuntime

    @property
    def task(self) -> str:
        return self.runtime.spec.task


def open_approved(model_dir: Path, limits: Limits) -> ServedModel:
    """Refuses (ArtifactError) an artifact that does not verify, or request limits beyond what it proves."""
    artifact = load_approved(model_dir)
    check_external_data(artifact.folder / MODEL_FILE, allowed=set(artifact.manifest["files"]))
    proven = artifact.manifest["limits"]
    if limits.max_seq_len > proven["max_seq_len"]:
        raise ArtifactError(
            f"{model_dir.name}: max_seq_len {limits.max_seq_len} exceeds the {proven['max_seq_len']} tokens its "
            "approval measured; re-run `make optimize` with the new limits"
        )
    runtime = ModelRuntime(
        artifact.folder,
        SessionSettings.from_json(artifact.manifest["session_options"]),
        max_seq_len=limits.max_seq_len,
        max_tokens_per_run=int(proven["max_tokens_per_run"]),
        max_batch=int(proven["max_batch"]),
    )
    return ServedModel(model_dir.name, artifact, runtime)
