"""Registry of candidate passes: each turns a base ONNX model into one variant worth measuring.

One file per kind of pass (graph optimization, quantization); this registry names the presets a
model config may list under `candidates`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.candidates.optimize import GraphOptimization
from pipeline.candidates.quantize import DYNAMIC_INT8_PRESETS, DynamicInt8
from pipeline.candidates.weight_only import WEIGHT_ONLY_PRESETS, WeightOnly


@dataclass(frozen=True)
class CandidatePass:
    """`base` names the candidate this one is built from; None means the validated fp32 export."""

    name: str
    base: str | None
    settings: dict[str, Any]
    build: Callable[[Path, Path, str], None] | None  # (model_in, model_out, model_type); None: copy as is


def _registry() -> dict[str, CandidatePass]:
    optimization = GraphOptimization()
    passes = [
        CandidatePass("fp32", None, {"precision": "fp32", "graph": "exported"}, None),
        CandidatePass("fp32-optimized", "fp32", optimization.settings(), optimization.apply),
    ]
    for name, config in DYNAMIC_INT8_PRESETS.items():
        quantizer = DynamicInt8(config)
        passes.append(CandidatePass(name, "fp32-optimized", quantizer.settings(), quantizer.apply))
    # Weight-only passes start from the unfused graph: fused attention would hide its MatMuls from them.
    for name, wo_config in WEIGHT_ONLY_PRESETS.items():
        weight_only = WeightOnly(wo_config)
        passes.append(CandidatePass(name, "fp32", weight_only.settings(), weight_only.apply))
    return {p.name: p for p in passes}


CANDIDATES = _registry()
