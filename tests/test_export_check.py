"""Export validation fails closed, also when the export came from the cache."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.config import ExportConfig
from pipeline.stages import StageError
from pipeline.stages.export import ExportStage

CONTEXT: Any = SimpleNamespace(model=SimpleNamespace(name="m"))


def test_drift_from_pytorch_is_refused() -> None:
    stage = ExportStage(ExportConfig(atol=1e-4))
    stage.check(CONTEXT, {"max_abs_diff": 3e-6})
    with pytest.raises(StageError, match=r"m: ONNX export differs from PyTorch by 2\.00e-03 \(> export.atol 1e-04\)"):
        stage.check(CONTEXT, {"max_abs_diff": 2e-3})


def test_drift_from_sentence_transformers_is_refused() -> None:
    stage = ExportStage(ExportConfig(min_reference_cosine=0.9999))
    stage.check(CONTEXT, {"max_abs_diff": 1e-6, "min_cosine_vs_sentence_transformers": 0.99999})
    with pytest.raises(StageError, match=r"min cosine 0\.998000 < 0\.9999"):
        stage.check(CONTEXT, {"max_abs_diff": 1e-6, "min_cosine_vs_sentence_transformers": 0.998})
