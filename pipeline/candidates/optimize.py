"""ONNX Runtime's transformer graph optimizer (attention, LayerNorm and GELU fusion), offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Encoder-only families whose graphs the optimizer's BERT fusions understand.
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "electra", "camembert"}


@dataclass(frozen=True)
class GraphOptimization:
    opt_level: int = 1  # basic ORT fusions offline; the runtime applies the rest at session creation

    def settings(self) -> dict[str, Any]:
        return {"precision": "fp32", "graph": "ort-transformers-optimizer", "opt_level": self.opt_level}

    def apply(self, model_in: Path, model_out: Path, model_type: str) -> None:
        from onnxruntime.transformers.optimizer import optimize_model

        family = "bert" if model_type in BERT_LIKE else model_type
        optimized = optimize_model(
            str(model_in), model_type=family, num_heads=0, hidden_size=0, opt_level=self.opt_level
        )
        optimized.save_model_to_file(str(model_out))
