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
from tokenizers import Tokenizer

from serve.artifacts import RUNTIME_FILE, ArtifactError
from serve.config import SessionSettings, SharedWeights
from serve.memory import map_in_full
from serve.prepacked import choose_weights

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


def session_options(settings: SessionSettings, optimize: bool = True) -> ort.SessionOptions:
    """ONNX Runtime's options for `settings`; `optimize=False` for a model saved already optimized (the
    prepacked one)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_num_threads
    options.inter_op_num_threads = settings.inter_op_num_threads
    options.enable_cpu_mem_arena = settings.enable_cpu_mem_arena
    options.enable_mem_pattern = settings.enable_mem_pattern
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    if settings.disable_prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


class InputTooLong(ValueError):
    """An input over a length limit (`max_input_chars` characters or `max_seq_len` tokens) when
    truncation is off, or a request over `max_request_chars` in all (index None)."""

    def __init__(self, index: int | None, limit_name: str, limit: int, size: int, unit: str):
        subject = "the request" if index is None else f"inputs[{index}]"
        super().__init__(f"{subject} has {size:,} {unit}, over {limit_name} ({limit:,})")
        self.index, self.limit_name, self.limit, self.size, self.unit = index, limit_name, limit, size, unit


def chars_per_token(tokenizer: Tokenizer) -> int:
    """The most characters one token can stand for: the longest vocabulary piece (without its
    continuation or word-start marker) plus one separator. A window of max_seq_len × this many characters
    holds every token that truncation to max_seq_len keeps, for any text whose words the vocabulary
    spells; only a word the tokenizer cannot spell at all (one [UNK] for up to 100 characters) or a run of
    separators covers more."""
    return 1 + max(len(piece.removeprefix("##").lstrip("Ġ▁")) for piece in tokenizer.get_vocab())


class ModelRuntime:
    """One loaded model. `max_tokens_per_run` bounds batch × padded length of every session run."""

    def __init__(
        self,
        folder: Path,
        session: SessionSettings,
        max_seq_len: int,
        max_tokens_per_run: int,
        max_batch: int | None = None,
        max_input_chars: int | None = None,
        max_request_chars: int | None = None,
        shared_weights: SharedWeights = "auto",
    ):
        self.folder = folder
        self.settings = session
        self.session_runs = 0  # micro-batches run so far (the service's metrics)
        self.spec = RuntimeSpec.read(folder)
        self.max_seq_len = max_seq_len
        self.max_tokens_per_run = max_tokens_per_run
        self.max_batch = max_batch or max_tokens_per_run
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        # The packaged tokenizer.json files pad to a fixed length; we pad per micro-batch ourselves.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_seq_len)
        self.pad_id = _pad_id(self.tokenizer)
        self.max_input_chars = max_input_chars or max_seq_len * chars_per_token(self.tokenizer)
        # What one service request may hold in all (checked by the service, which knows what a request is).
        self.max_request_chars = max_request_chars or self.max_batch * self.max_input_chars
        if not (folder / MODEL_FILE).is_file():
            raise ArtifactError(f"{folder / MODEL_FILE}: missing")
        self.weights = choose_weights(folder / MODEL_FILE, shared_weights, not session.disable_prepacking)
        options = session_options(session, optimize=not self.weights.shared)
        self.session = ort.InferenceSession(
            str(self.weights.path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        map_in_full(folder)  # the weights ONNX Runtime mapped, resident from now on (serve/memory.py)

    def bound(self, texts: Sequence[str], truncate: bool = True) -> list[str]:
        """The texts cut to `max_input_chars` (truncate) or refused over it, before any tokenizing: the
        tokenizer builds every overflow window of its whole input, so its memory grows with the text."""
        if not truncate:
            for index, text in enumerate(texts):
                if len(text) > self.max_input_chars:
                    raise InputTooLong(index, "max_input_chars", self.max_input_chars, len(text), "characters")
        return [text[: self.max_input_chars] for text in texts]

    def token_ids(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Each text's token ids (at most max_seq_len), refusing (InputTooLong) a longer one unless
        `truncate`. One text at a time, keeping only the ids: the tokenizer builds every overflow window of
        its input, and a batch would hold all of them at once."""
        rows = []
        for index, text in enumerate(self.bound(texts, truncate)):
            encoding = self.tokenizer.encode(text)
            if encoding.overflowing and not truncate:
                tokens = len(encoding.ids) + sum(len(o.ids) for o in encoding.overflowing)
                raise InputTooLong(index, "max_seq_len", self.max_seq_len, tokens, "tokens")
            rows.append(encoding.ids)
        return rows

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

    def feeds(self, rows: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        width = max(map(len, rows))
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return {name: feeds[name] for name in self.input_names}

    def run(self, rows: Sequence[Sequence[int]], normalize: bool | None = None, raw_scores: bool = False) -> np.ndarray:
        """The model's answer per input (token ids), in order: pooled embeddings, L2-normalized as the
        model was trained (`normalize` None) or as asked; class probabilities, or logits (`raw_scores`)."""
        results: list[np.ndarray] = [np.empty(0)] * len(rows)
        for group in self.micro_batches([len(tokens) for tokens in rows]):
            feeds = self.feeds([rows[i] for i in group])
            output = self.session.run(None, feeds)[0]
            self.session_runs += 1
            values = self._postprocess(output, feeds["attention_mask"], normalize, raw_scores)
            for row, index in enumerate(group):
                results[index] = values[row]
        return np.stack(results)

    def _postprocess(
        self, output: np.ndarray, mask: np.ndarray, normalize: bool | None, raw_scores: bool
    ) -> np.ndarray:
        if self.spec.task == "text-classification":
            return output.astype(np.float32) if raw_scores else softmax(output.astype(np.float32))
        pooled = pool(output.astype(np.float32), mask, self.spec.pooling or "mean")
        if self.spec.normalize if normalize is None else normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled

    def embed(self, texts: Sequence[str], truncate: bool = True) -> np.ndarray:
        return self.run(self.token_ids(texts, truncate))


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
