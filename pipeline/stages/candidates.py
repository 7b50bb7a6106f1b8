"""Build every configured candidate from the validated export; each folder is built once per source
and settings (a calibrated search also keys on its calibration texts and targets), and carries its
weights prepacked for this runtime and CPU (pipeline/prepack.py), which is what is measured and shipped."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_dir, json_bytes
from pipeline.candidates import CANDIDATES, Calibration, CandidatePass, PassJob
from pipeline.candidates.mixed_precision import SEARCH_FILE
from pipeline.config import Gates
from pipeline.data import Dataset
from pipeline.prepack import ensure_prepacked
from pipeline.progress import step
from pipeline.state import BuildContext, BuildState, Candidate, ExportedModel, SourceModel
from serve.artifacts import RUNTIME_FILE, read_json
from serve.config import SessionSettings
from serve.onnx_refs import check_external_data
from serve.runtime import MODEL_FILE, TOKENIZER_FILE, session_options

SETTINGS_FILE = "settings.json"


def candidate_folder(exported: ExportedModel, name: str) -> Path:
    return exported.folder.parent / "candidates" / name


@dataclass(frozen=True)
class CandidateBuilder:
    context: BuildContext
    source: SourceModel
    exported: ExportedModel
    calibration_texts: tuple[str, ...]
    gates: Gates

    def settings(self, spec: CandidatePass) -> dict[str, Any]:
        if not spec.calibrated:
            return spec.settings
        return {**spec.settings, **self.calibration().describe()}

    def calibration(self) -> Calibration:
        reference = self.build(CANDIDATES["fp32"])
        return Calibration(self.calibration_texts, reference, self.context.service.limits.max_seq_len, self.gates)

    def build(self, spec: CandidatePass) -> Path:
        """The candidate's folder (model.onnx, tokenizer.json, runtime.json), built from its base if needed."""
        target = candidate_folder(self.exported, spec.name)
        settings = self.settings(spec)
        if (target / SETTINGS_FILE).is_file() and read_json(target / SETTINGS_FILE) == settings:
            return target
        base = self.exported.folder if spec.base is None else self.build(CANDIDATES[spec.base])
        with atomic_dir(target) as tmp:
            for name in (TOKENIZER_FILE, RUNTIME_FILE):
                shutil.copy2(base / name, tmp / name)
            if spec.build is None:
                shutil.copy2(base / MODEL_FILE, tmp / MODEL_FILE)
            else:
                calibration = self.calibration() if spec.calibrated else None
                job = PassJob(base / MODEL_FILE, tmp / MODEL_FILE, self.source.model_type, calibration)
                with step(f"{self.context.model.name}: build candidate {spec.name}"):
                    spec.build(job)
            check_external_data(tmp / MODEL_FILE)
            (tmp / SETTINGS_FILE).write_bytes(json_bytes(settings))
        return target


@dataclass(frozen=True)
class CandidatesStage:
    names: tuple[str, ...]
    gates: Gates
    calibration_size: int
    name: str = "candidates"

    def run(self, context: BuildContext, state: BuildState) -> BuildState:
        dataset: Dataset = state.require("dataset")
        builder = CandidateBuilder(
            context,
            state.require("source"),
            state.require("exported"),
            tuple(dataset.train.texts[: self.calibration_size]),
            self.gates,
        )
        # fp32 is always built: it is the reference every other candidate is judged against.
        names = ("fp32", *[n for n in self.names if n != "fp32"])
        candidates = []
        for name in names:
            spec = CANDIDATES[name]
            folder = builder.build(spec)
            size = (folder / MODEL_FILE).stat().st_size / 2**20
            search = read_json(folder / SEARCH_FILE) if (folder / SEARCH_FILE).is_file() else None
            ensure_prepacked(folder / MODEL_FILE, session_options(SessionSettings()))
            candidates.append(Candidate(name, folder, builder.settings(spec), round(size, 1), search))
        return replace(state, candidates=tuple(candidates))
