"""Score every candidate on real data: its fidelity to fp32 and, when the data is labelled, its task metric.

Embeddings: cosine and top-10 neighbour overlap against fp32; with labels, also a logistic-regression probe
trained once on fp32 train-split vectors scoring every candidate's test vectors (the deployed situation:
the head was fit on fp32). A probe can hide damage that search users feel, so fidelity is always gated.
Classification: top-1 agreement with fp32; with labels, also accuracy.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from pipeline import inference
from pipeline.cache import cache_key
from pipeline.config import EvalConfig
from pipeline.data import Dataset
from pipeline.fidelity import FidelityReference
from pipeline.state import BuildContext, BuildState, Candidate, Evaluation
from serve.artifacts import sha256_file
from serve.config import ConfigError
from serve.runtime import MODEL_FILE, ModelRuntime, RuntimeSpec

EVALUATION_VERSION = 2  # bump when scoring changes: cached evaluations keyed on it are then recomputed


def infer(runtime: ModelRuntime, texts: list[str], label: str) -> tuple[np.ndarray, float]:
    """Outputs for all texts (truncated to max_seq_len as the service would) and inputs per second."""
    started = time.perf_counter()
    outputs = inference.outputs(runtime, texts, label)
    return outputs, len(texts) / (time.perf_counter() - started)


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


class Reference:
    """What fp32 produced on the test split (and, for labelled embeddings, the probe head fit on its
    train-split vectors): every candidate is scored against it."""

    def __init__(
        self,
        test: np.ndarray,
        test_throughput: float,
        train: np.ndarray | None,
        labels: tuple[str, ...],
        dataset: Dataset,
        context: BuildContext,
        seed: int,
    ):
        self.fidelity = FidelityReference(test, embedding=context.model.task == "feature-extraction")
        self.scored = (test, test_throughput)  # fp32's own evaluation: the test split is not run twice
        self.dataset, self.context = dataset, context
        self.probe = None if train is None else fit_probe(train, dataset.train.label_ids, seed)
        self.accuracy = self.accuracy_of(test, labels) if dataset.labelled else None

    def accuracy_of(self, outputs: np.ndarray, labels: tuple[str, ...]) -> float:
        return float((self.predictions(outputs, labels) == self.dataset.test.label_ids).mean())

    def predictions(self, outputs: np.ndarray, labels: tuple[str, ...]) -> np.ndarray:
        if self.probe is not None:
            return np.asarray(self.probe.predict(outputs))
        return class_predictions(outputs, labels, self.dataset, self.context)


@dataclass(frozen=True)
class EvaluateStage:
    config: EvalConfig
    name: str = "evaluate"

    def runtime(self, context: BuildContext, candidate: Candidate) -> ModelRuntime:
        limits = context.service.limits
        settings = context.model.session_options
        return ModelRuntime(
            candidate.folder, settings, limits.max_seq_len, context.max_tokens_per_run, limits.max_batch
        )

    def key(self, context: BuildContext, dataset: Dataset, candidate: Candidate) -> str:
        """Everything a candidate's scores depend on; the same key means the same scores."""
        return cache_key(
            version=EVALUATION_VERSION,
            model=sha256_file(candidate.folder / MODEL_FILE),
            data=dataset.fingerprint,
            eval=self.config.model_dump(),
            limits=context.service.limits.model_dump(include={"max_batch", "max_seq_len"}),  # body limits: no effect
            session=context.model.session_options.model_dump(),
        )

    def reference(self, context: BuildContext, dataset: Dataset, fp32: Candidate) -> Reference:
        embedding = context.model.task == "feature-extraction"
        key = self.key(context, dataset, fp32)
        arrays = context.results.get_arrays("reference", key)
        if arrays is None:
            runtime = self.runtime(context, fp32)
            test, throughput = infer(runtime, dataset.test.texts, f"{context.model.name}: fp32 test outputs")
            arrays = {"test": test, "test_throughput": np.array(throughput)}
            if embedding and dataset.labelled:
                label = f"{context.model.name}: fp32 train vectors for the probe"
                arrays["train"] = infer(runtime, dataset.train.texts, label)[0]
            context.results.put_arrays("reference", key, arrays)
        labels = RuntimeSpec.read(fp32.folder).labels
        throughput = float(arrays["test_throughput"])
        return Reference(arrays["test"], throughput, arrays.get("train"), labels, dataset, context, self.config.seed)

    def run(self, context: BuildContext, state: BuildState) -> BuildState:
        dataset: Dataset = state.require("dataset")
        candidates: tuple[Candidate, ...] = state.require("candidates")
        reference = self.reference(context, dataset, candidates[0])  # fp32 comes first
        evaluations = {}
        for candidate in candidates:
            key = self.key(context, dataset, candidate)
            cached = context.results.get("evaluation", key)
            if cached is None:
                scored = reference.scored if candidate is candidates[0] else None
                evaluation = self.evaluate(context, dataset, reference, candidate, scored)
                context.results.put("evaluation", key, asdict(evaluation))
            else:
                evaluation = Evaluation(**cached)
            evaluations[candidate.variant] = evaluation
        return replace(state, evaluations=evaluations)

    def evaluate(
        self,
        context: BuildContext,
        dataset: Dataset,
        reference: Reference,
        candidate: Candidate,
        scored: tuple[np.ndarray, float] | None = None,
    ) -> Evaluation:
        """`scored`: the candidate's test outputs and inputs/s when already computed (fp32's, by the reference)."""
        runtime = self.runtime(context, candidate)
        label = f"{context.model.name}: evaluate {candidate.variant}"
        outputs, throughput = scored or infer(runtime, dataset.test.texts, label)
        metric = None
        if reference.accuracy is not None:  # labelled data
            accuracy = reference.accuracy_of(outputs, runtime.spec.labels)
            metric = {
                "metric": "probe_accuracy" if context.model.task == "feature-extraction" else "accuracy",
                "reference": round(reference.accuracy, 6),
                "value": round(accuracy, 6),
                "delta": round((accuracy - reference.accuracy) * 100, 3),
                "n_test": len(dataset.test.texts),
            }
        return Evaluation(
            accuracy=metric,
            **reference.fidelity.compare(outputs).evaluation_fields(),
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
