"""Export to ONNX with the optimum-onnx exporter, then validate against PyTorch on real inputs.

Fails closed: an export whose outputs drift from PyTorch (max abs diff) or, for sentence-transformers
models, whose embeddings drift from SentenceTransformer.encode (cosine) is never used.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_dir, json_bytes
from pipeline.config import ExportConfig
from pipeline.progress import step
from pipeline.stages import StageError
from pipeline.state import BuildContext, BuildState, ExportedModel, SourceModel
from serve.artifacts import RUNTIME_FILE, read_json
from serve.config import SessionSettings
from serve.runtime import TOKENIZER_FILE, ModelRuntime, RuntimeSpec

VALIDATION_FILE = "validation.json"
REFERENCE_BATCH = 16


def export_dir(context: BuildContext, source: SourceModel, config: ExportConfig) -> Path:
    """Exports are cached per (weights, opset, max_seq_len): identical inputs give the identical graph."""
    key = f"{source.weights_sha256[:16]}-opset{config.opset}-seq{context.service.limits.max_seq_len}"
    return context.work_dir / key / "export"


def reference_outputs(source: SourceModel, task: str, runtime: ModelRuntime, texts: list[str]) -> float:
    """Max abs difference between PyTorch and ONNX raw outputs on the same token ids."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    loader = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    model = loader.from_pretrained(str(source.folder), use_safetensors=True).eval()
    worst = 0.0
    rows = runtime.token_ids(texts)
    for start in range(0, len(rows), REFERENCE_BATCH):
        feeds = runtime.feeds(rows[start : start + REFERENCE_BATCH])
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        expected = (out.logits if task == "text-classification" else out.last_hidden_state).numpy()
        actual = runtime.session.run(None, feeds)[0]
        mask = feeds["attention_mask"].astype(bool)
        diff = np.abs(expected - actual)
        worst = max(worst, float(diff.max() if task == "text-classification" else diff[mask].max()))
    return worst


def sentence_transformer_cosine(source: SourceModel, runtime: ModelRuntime, texts: list[str]) -> float:
    """Minimum cosine between SentenceTransformer.encode and our pooled ONNX embeddings."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(source.folder), device="cpu")
    expected = model.encode(texts, batch_size=REFERENCE_BATCH, convert_to_numpy=True)
    actual = runtime.embed(texts)
    cos = (expected * actual).sum(1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1))
    return float(cos.min())


@dataclass(frozen=True)
class ExportStage:
    config: ExportConfig
    name: str = "export"

    def run(self, context: BuildContext, state: BuildState) -> BuildState:
        source: SourceModel = state.require("source")
        target = export_dir(context, source, self.config)
        if not (target / VALIDATION_FILE).is_file():
            with atomic_dir(target) as tmp:
                self._export(context, source, tmp, state)
        validation = read_json(target / VALIDATION_FILE)
        self.check(context, validation)
        return replace(state, exported=ExportedModel(folder=target, validation=validation))

    def check(self, context: BuildContext, validation: dict[str, float]) -> None:
        """Fail closed on drift from PyTorch or SentenceTransformer (also for a cached export)."""
        if validation["max_abs_diff"] > self.config.atol:
            raise StageError(
                f"{context.model.name}: ONNX export differs from PyTorch by {validation['max_abs_diff']:.2e} "
                f"(> export.atol {self.config.atol:.0e}); refusing the export"
            )
        cosine = validation.get("min_cosine_vs_sentence_transformers")
        if cosine is not None and cosine < self.config.min_reference_cosine:
            raise StageError(
                f"{context.model.name}: ONNX embeddings differ from SentenceTransformer "
                f"(min cosine {cosine:.6f} < {self.config.min_reference_cosine}); refusing the export"
            )

    def _export(self, context: BuildContext, source: SourceModel, out: Path, state: BuildState) -> None:
        from optimum.exporters.onnx import main_export

        with step(f"{context.model.name}: export to ONNX (opset {self.config.opset})"):
            logging.getLogger("optimum").setLevel(logging.ERROR)
            main_export(
                str(source.folder),
                output=out,
                task=context.model.task,
                library_name="transformers",
                opset=self.config.opset,
                atol=self.config.atol,
                do_validation=True,
            )
        if not (out / TOKENIZER_FILE).is_file():  # the exporter saves only tokenizers transformers can load
            shutil.copy2(source.folder / TOKENIZER_FILE, out / TOKENIZER_FILE)
        spec = RuntimeSpec(
            task=context.model.task, pooling=source.pooling, normalize=source.normalize, labels=source.labels
        )
        (out / RUNTIME_FILE).write_bytes(json_bytes(spec.to_json()))
        limits = context.service.limits
        runtime = ModelRuntime(out, SessionSettings(), limits.max_seq_len, context.max_tokens_per_run)
        pool = state.require("dataset").test.texts
        fitting = [t for t, e in zip(pool, runtime.tokenizer.encode_batch(pool), strict=True) if not e.overflowing]
        texts = fitting[: self.config.validation_examples]
        with step(f"{context.model.name}: validate ONNX against PyTorch on {len(texts)} real texts"):
            validation = {
                "examples": float(len(texts)),
                "max_abs_diff": reference_outputs(source, context.model.task, runtime, texts),
            }
            if source.is_sentence_transformer:
                validation["min_cosine_vs_sentence_transformers"] = sentence_transformer_cosine(source, runtime, texts)
        (out / VALIDATION_FILE).write_bytes(json_bytes(validation))
