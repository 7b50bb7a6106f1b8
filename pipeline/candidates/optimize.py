"""ONNX Runtime's transformer graph optimizer (attention, LayerNorm and GELU fusion), offline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.candidates import PassJob

# Encoder-only families whose graphs the optimizer's BERT fusions understand.
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "electra", "camembert"}


@dataclass(frozen=True)
class GraphOptimization:
    opt_level: int = 1  # basic ORT fusions offline; the runtime applies the rest at session creation

    def settings(self) -> dict[str, Any]:
        return {"precision": "fp32", "graph": "ort-transformers-optimizer", "opt_level": self.opt_level}

    def apply(self, job: PassJob) -> None:
        from onnxruntime.transformers.optimizer import optimize_model

        family = "bert" if job.model_type in BERT_LIKE else job.model_type
        optimized = optimize_model(
            str(job.model_in), model_type=family, num_heads=0, hidden_size=0, opt_level=self.opt_level
        )
        optimized.save_model_to_file(str(job.model_out))
