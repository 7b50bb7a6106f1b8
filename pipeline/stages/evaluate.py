"""Score every candidate on real labelled data, and its fidelity to fp32.

Embeddings: a logistic-regression probe trained once on fp32 train-split vectors scores every
candidate's test vectors (the deployed situation: the head was fit on fp32), beside cosine and top-10
neighbour overlap against fp32, because a probe can hide damage that search users feel.
Classification: accuracy against the labels and top-1 agreement with fp32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline.config import EvalConfig
from pipeline.data import Dataset
from pipeline.progress import bar
from pipeline.state import BuildContext, BuildState, Candidate, Evaluation
from serve.config import ConfigError
from serve.runtime import ModelRuntime, SessionSettings

CHUNK = 256
NEIGHBOURS = 10


def infer(runtime: ModelRuntime, texts: list[str], label: str) -> tuple[np.ndarray, float]:
    """Outputs for all texts (truncated to max_seq_len as the service would) and inputs per second."""
    started = time.perf_counter()
    chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
    outputs = [runtime.embed(chunk) for chunk in bar(chunks, label)]
    return np.concatenate(outputs), len(texts) / (time.perf_counter() - started)


def latency(runtime: ModelRuntime, texts: list[str]) -> dict[str, float]:
    runtime.embed(texts[:1])  # warm-up
    samples = []
    for text in texts:
        started = time.perf_counter()
        runtime.embed([text])
        samples.append((time.perf_counter() - started) * 1000)
    return {
        "p50": round(float(np.percentile(samples, 50)), 3),
        "p95": round(float(np.percentile(samples, 95)), 3),
    }


def cosine_to_reference(vectors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (vectors * reference).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))


def top_neighbours(vectors: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """Each row's k nearest other rows by cosine (the row itself excluded), computed in blocks."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    result = np.empty((len(unit), k), dtype=np.int64)
    for start in range(0, len(unit), 1024):
        scores = unit[start : start + 1024] @ unit.T
        rows = np.arange(scores.shape[0])
        scores[rows, start + rows] = -np.inf
        result[start : start + 1024] = np.argpartition(-scores, k, axis=1)[:, :k]
    return result


def neighbour_overlap(candidate: np.ndarray, reference_neighbours: np.ndarray) -> float:
    mine = top_neighbours(candidate, reference_neighbours.shape[1])
    shared = [len(set(a) & set(b)) for a, b in zip(mine, reference_neighbours, strict=True)]
    return float(np.mean(shared)) / reference_neighbours.shape[1]


@dataclass(frozen=True)
class Reference:
    """What fp32 produced: test outputs, its neighbour lists and the probe head trained on its vectors."""

    outputs: np.ndarray
    neighbours: np.ndarray | None
    predictions: np.ndarray
    accuracy: float


@dataclass(frozen=True)
class EvaluateStage:
    config: EvalConfig
    name: str = "evaluate"

    def runtime(self, context: BuildContext, candidate: Candidate) -> ModelRuntime:
        limits = context.service.limits
        settings = SessionSettings(**context.model.session_options.model_dump())
        return ModelRuntime(
            candidate.folder, settings, limits.max_seq_len, context.max_tokens_per_run, limits.max_batch
        )

    def run(self, context: BuildContext, state: BuildState) -> BuildState:
        dataset: Dataset = state.require("dataset")
        candidates: tuple[Candidate, ...] = state.require("candidates")
        name = context.model.name
        reference: Reference | None = None
        probe = None
        evaluations = {}
        for candidate in candidates:  # fp32 comes first
            runtime = self.runtime(context, candidate)
            outputs, throughput = infer(runtime, dataset.test.texts, f"{name}: evaluate {candidate.variant}")
            if context.model.task == "feature-extraction":
                if probe is None:
                    train, _ = infer(runtime, dataset.train.texts, f"{name}: fp32 train vectors for the probe")
                    probe = fit_probe(train, dataset.train.labels, self.config.seed)
                predictions = probe.predict(outputs)
            else:
                predictions = class_predictions(outputs, runtime.spec.labels, dataset, context)
            accuracy = float((predictions == dataset.test.labels).mean())
            if reference is None:
                neighbours = top_neighbours(outputs) if context.model.task == "feature-extraction" else None
                reference = Reference(outputs, neighbours, predictions, accuracy)
            evaluations[candidate.variant] = self.score(
                context, runtime, dataset, reference, outputs, predictions, accuracy, throughput
            )
        return replace(state, evaluations=evaluations)

    def score(
        self,
        context: BuildContext,
        runtime: ModelRuntime,
        dataset: Dataset,
        reference: Reference,
        outputs: np.ndarray,
        predictions: np.ndarray,
        accuracy: float,
        throughput: float,
    ) -> Evaluation:
        embedding = context.model.task == "feature-extraction"
        cosine = neighbours = agreement = None
        if embedding and reference.neighbours is not None:
            cos = cosine_to_reference(outputs, reference.outputs)
            cosine = {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6)}
            neighbours = {"overlap_at_10": round(neighbour_overlap(outputs, reference.neighbours), 4)}
        else:
            agreement = round(float((predictions == reference.predictions).mean()), 6)
        return Evaluation(
            accuracy={
                "metric": "probe_accuracy" if embedding else "accuracy",
                "reference": round(reference.accuracy, 6),
                "value": round(accuracy, 6),
                "delta": round((accuracy - reference.accuracy) * 100, 3),
                "n_test": len(dataset.test.texts),
            },
            cosine=cosine,
            neighbours=neighbours,
            agreement=agreement,
            latency_ms=latency(runtime, dataset.test.texts[: self.config.latency_samples]),
            throughput=round(throughput, 1),
        )


def fit_probe(vectors: np.ndarray, labels: np.ndarray, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000, random_state=seed).fit(vectors, labels)


def class_predictions(
    probabilities: np.ndarray, model_labels: tuple[str, ...], dataset: Dataset, context: BuildContext
) -> np.ndarray:
    """Map the model's predicted label names onto the dataset's label indices."""
    missing = [name for name in dataset.label_names if name not in model_labels]
    if missing:
        raise ConfigError(
            f"{context.config_path}: field 'eval.labels': {missing} not among the model's id2label labels "
            f"{list(model_labels)}"
        )
    mapping = np.array([dataset.label_names.index(n) if n in dataset.label_names else -1 for n in model_labels])
    return mapping[probabilities.argmax(axis=1)]
