"""Build every configured candidate from the validated export; each folder is built once per source."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.atomic import atomic_dir, json_bytes
from pipeline.candidates import CANDIDATES, CandidatePass
from pipeline.progress import step
from pipeline.state import BuildContext, BuildState, Candidate, ExportedModel, SourceModel
from serve.artifacts import RUNTIME_FILE, read_json
from serve.onnx_refs import check_external_data
from serve.runtime import MODEL_FILE, TOKENIZER_FILE

SETTINGS_FILE = "settings.json"


def candidate_folder(exported: ExportedModel, name: str) -> Path:
    return exported.folder.parent / "candidates" / name


def build_candidate(context: BuildContext, source: SourceModel, exported: ExportedModel, spec: CandidatePass) -> Path:
    """The candidate's folder (model.onnx, tokenizer.json, runtime.json), built from its base if needed."""
    target = candidate_folder(exported, spec.name)
    if (target / SETTINGS_FILE).is_file() and read_json(target / SETTINGS_FILE) == spec.settings:
        return target
    base = exported.folder if spec.base is None else build_candidate(context, source, exported, CANDIDATES[spec.base])
    with atomic_dir(target) as tmp:
        for name in (TOKENIZER_FILE, RUNTIME_FILE):
            shutil.copy2(base / name, tmp / name)
        if spec.build is None:
            shutil.copy2(base / MODEL_FILE, tmp / MODEL_FILE)
        else:
            with step(f"{context.model.name}: build candidate {spec.name}"):
                spec.build(base / MODEL_FILE, tmp / MODEL_FILE, source.model_type)
        check_external_data(tmp / MODEL_FILE)
        (tmp / SETTINGS_FILE).write_bytes(json_bytes(spec.settings))
    return target


@dataclass(frozen=True)
class CandidatesStage:
    names: tuple[str, ...]
    name: str = "candidates"

    def run(self, context: BuildContext, state: BuildState) -> BuildState:
        source: SourceModel = state.require("source")
        exported: ExportedModel = state.require("exported")
        # fp32 is always built: it is the reference every other candidate is judged against.
        names = ("fp32", *[n for n in self.names if n != "fp32"])
        candidates = []
        for name in names:
            spec = CANDIDATES[name]
            folder = build_candidate(context, source, exported, spec)
            size = (folder / MODEL_FILE).stat().st_size / 2**20
            candidates.append(Candidate(name, folder, spec.settings, round(size, 1)))
        return replace(state, candidates=tuple(candidates))
