"""ONNX Runtime inference for one model folder: tokenize, run in bounded micro-batches, pool.

The pipeline evaluates and measures candidates through this same code, so the vectors and the memory
peak it approves are the ones the service produces.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from serve.artifacts import RUNTIME_FILE, ArtifactError

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"

Pooling = Literal["mean", "cls", "max", "mean_sqrt_len"]


@dataclass(frozen=True)
class RuntimeSpec:
    """What `runtime.json` records about how to turn model outputs into the model's answer."""

    task: Literal["feature-extraction", "text-classification"]
    pooling: Pooling | None = None
    normalize: bool = False
    labels: tuple[str, ...] = ()

    @classmethod
    def read(cls, folder: Path) -> RuntimeSpec:
        data = json.loads((folder / RUNTIME_FILE).read_text(encoding="utf-8"))
        return cls(
            task=data["task"],
            pooling=data.get("pooling"),
            normalize=bool(data.get("normalize", False)),
            labels=tuple(data.get("labels", ())),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "labels": list(self.labels),
        }


@dataclass(frozen=True)
class SessionSettings:
    """ONNX Runtime session options that change memory and speed; recorded in the manifest."""

    intra_op_num_threads: int = 2
    inter_op_num_threads: int = 1
    enable_cpu_mem_arena: bool = True
    enable_mem_pattern: bool = False
    disable_prepacking: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionSettings:
        return cls(**data)

    def build(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_num_threads
        options.inter_op_num_threads = self.inter_op_num_threads
        options.enable_cpu_mem_arena = self.enable_cpu_mem_arena
        options.enable_mem_pattern = self.enable_mem_pattern
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if self.disable_prepacking:
            options.add_session_config_entry("session.disable_prepacking", "1")
        return options


class InputTooLong(ValueError):
    """An input longer than max_seq_len tokens when truncation is off."""

    def __init__(self, index: int, tokens: int, limit: int):
        super().__init__(f"input {index} has more than {limit} tokens (max_seq_len)")
        self.index, self.tokens, self.limit = index, tokens, limit


class ModelRuntime:
    """One loaded model. `max_tokens_per_run` bounds batch × padded length of every session run."""

    def __init__(
        self,
        folder: Path,
        session: SessionSettings,
        max_seq_len: int,
        max_tokens_per_run: int,
        max_batch: int | None = None,
    ):
        self.folder = folder
        self.spec = RuntimeSpec.read(folder)
        self.max_seq_len = max_seq_len
        self.max_tokens_per_run = max_tokens_per_run
        self.max_batch = max_batch or max_tokens_per_run
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        # The packaged tokenizer.json files pad to a fixed length; we pad per micro-batch ourselves.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_seq_len)
        self.pad_id = _pad_id(self.tokenizer)
        model_path = folder / MODEL_FILE
        if not model_path.is_file():
            raise ArtifactError(f"{model_path}: missing")
        self.session = ort.InferenceSession(
            str(model_path), sess_options=session.build(), providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    def encode(self, texts: Sequence[str], truncate: bool = True) -> list[Encoding]:
        encodings = self.tokenizer.encode_batch(list(texts))
        if not truncate:
            for index, encoding in enumerate(encodings):
                if encoding.overflowing:
                    extra = sum(len(o.ids) for o in encoding.overflowing)
                    raise InputTooLong(index, len(encoding.ids) + extra, self.max_seq_len)
        return encodings

    def micro_batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Indices grouped by similar length so each group's batch × longest ≤ max_tokens_per_run."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        group: list[int] = []
        for index in order:
            longest = lengths[index]  # sorted ascending: the newcomer is the longest
            if group and ((len(group) + 1) * longest > self.max_tokens_per_run or len(group) >= self.max_batch):
                yield group
                group = []
            group.append(index)
        if group:
            yield group

    def feeds(self, encodings: Sequence[Encoding]) -> dict[str, np.ndarray]:
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return {name: feeds[name] for name in self.input_names}

    def run(self, encodings: Sequence[Encoding]) -> np.ndarray:
        """The model's answer per input: pooled embeddings or class probabilities, in input order."""
        results: list[np.ndarray] = [np.empty(0)] * len(encodings)
        for group in self.micro_batches([len(e.ids) for e in encodings]):
            batch = [encodings[i] for i in group]
            feeds = self.feeds(batch)
            output = self.session.run(None, feeds)[0]
            values = self._postprocess(output, feeds["attention_mask"])
            for row, index in enumerate(group):
                results[index] = values[row]
        return np.stack(results)

    def _postprocess(self, output: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.spec.task == "text-classification":
            return softmax(output.astype(np.float32))
        pooled = pool(output.astype(np.float32), mask, self.spec.pooling or "mean")
        if self.spec.normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled

    def embed(self, texts: Sequence[str], truncate: bool = True) -> np.ndarray:
        return self.run(self.encode(texts, truncate))


def pool(hidden: np.ndarray, mask: np.ndarray, mode: Pooling) -> np.ndarray:
    """sentence-transformers pooling modes over the last hidden state."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask[..., None].astype(np.float32)
    if mode == "max":
        return np.where(weights > 0, hidden, -1e9).max(axis=1)
    summed = (hidden * weights).sum(axis=1)
    counts = np.maximum(weights.sum(axis=1), 1e-9)
    return summed / (np.sqrt(counts) if mode == "mean_sqrt_len" else counts)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _pad_id(tokenizer: Tokenizer) -> int:
    for token in ("[PAD]", "<pad>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0
