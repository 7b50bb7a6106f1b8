"""Registry of candidate passes: each turns a base ONNX model into one variant worth measuring.

One file per kind of pass (graph optimization, dynamic int8, mixed precision, weight-only); this
registry names the presets a model config may list under `candidates`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.candidates.mixed_precision import MIXED_PRECISION_PRESETS, Calibration, MixedPrecision
from pipeline.candidates.optimize import GraphOptimization
from pipeline.candidates.quantize import DYNAMIC_INT8_PRESETS, DynamicInt8
from pipeline.candidates.weight_only import WEIGHT_ONLY_PRESETS, WeightOnly


@dataclass(frozen=True)
class PassJob:
    """One pass run: `model_out` sits in the candidate's temp folder beside its tokenizer and runtime
    spec; `calibration` is given to passes that search against fp32."""

    model_in: Path
    model_out: Path
    model_type: str
    calibration: Calibration | None = None


@dataclass(frozen=True)
class CandidatePass:
    """`base` names the candidate this one is built from; None means the validated fp32 export."""

    name: str
    base: str | None
    settings: dict[str, Any]
    build: Callable[[PassJob], None] | None  # None: copy the base model as is
    calibrated: bool = False  # the pass searches on calibration texts against fp32


def _registry() -> dict[str, CandidatePass]:
    optimization = GraphOptimization()
    passes = [
        CandidatePass("fp32", None, {"precision": "fp32", "graph": "exported"}, None),
        CandidatePass("fp32-optimized", "fp32", optimization.settings(), optimization.apply),
    ]
    for name, config in DYNAMIC_INT8_PRESETS.items():
        quantizer = DynamicInt8(config)
        passes.append(CandidatePass(name, "fp32-optimized", quantizer.settings(), quantizer.apply))
    for name, mixed_config in MIXED_PRECISION_PRESETS.items():
        mixed = MixedPrecision(mixed_config)
        passes.append(CandidatePass(name, "fp32-optimized", mixed.settings(), mixed.apply, calibrated=True))
    # Weight-only passes start from the unfused graph: fused attention would hide its MatMuls from them.
    for name, wo_config in WEIGHT_ONLY_PRESETS.items():
        weight_only = WeightOnly(wo_config)
        passes.append(CandidatePass(name, "fp32", weight_only.settings(), weight_only.apply))
    return {p.name: p for p in passes}


CANDIDATES = _registry()
