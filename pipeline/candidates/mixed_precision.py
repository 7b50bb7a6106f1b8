"""Dynamic int8 with its most sensitive nodes kept in fp32: the fewest needed to meet the gates.

Nodes are ranked by their end-to-end sensitivity: the fp32 graph is run once per node with only that
node computing as dynamic int8 does (weight rounded through int8, activation through the run-time
DynamicQuantizeLinear), and the model output's relative error is its score. A bisection over "keep
the k worst in fp32" then quantizes for real and checks fidelity against fp32 on calibration texts from
the train split, and keeps the smallest k that meets the model's fidelity gates, tightened by a
headroom because calibration is not the test split (the Intel Neural Compressor fallback idea).
Every trial is recorded in the candidate's search.json.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import inference
from pipeline.atomic import json_bytes
from pipeline.candidates.quantize import DynamicInt8, DynamicInt8Config
from pipeline.config import Gates
from pipeline.fidelity import Fidelity, FidelityReference
from pipeline.gates import fidelity_failures
from pipeline.progress import bar
from serve.config import SessionSettings
from serve.runtime import MODEL_FILE, ModelRuntime, RuntimeSpec

if TYPE_CHECKING:
    from pipeline.candidates import PassJob

SEARCH_FILE = "search.json"
WEIGHT_INPUT = {"MatMul": 1, "Attention": 1}  # op types ranked (index of their constant weight input)
CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class Calibration:
    """Train-split texts and the fp32 candidate the search compares against, with the gates to meet."""

    texts: tuple[str, ...]
    reference: Path  # the fp32 candidate's folder
    max_seq_len: int
    gates: Gates

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256("\n".join(self.texts).encode()).hexdigest()[:16]
        targets = self.gates.model_dump(include={"min_mean_cosine", "min_overlap_at_10", "min_agreement"})
        return {"calibration": {"texts": len(self.texts), "sha256": digest, "targets": targets}}

    def runtime(self, folder: Path) -> ModelRuntime:
        return ModelRuntime(folder, SessionSettings(), self.max_seq_len, CALIBRATION_BATCH * self.max_seq_len)

    def outputs(self, folder: Path, label: str) -> np.ndarray:
        return inference.outputs(self.runtime(folder), self.texts, label)


@dataclass(frozen=True)
class MixedPrecisionConfig:
    int8: DynamicInt8Config
    ranking_texts: int = 64  # calibration texts (one batch) on which each node's sensitivity is measured
    # Calibration texts are not the test split: aim this share closer to fp32 than the gates ask, so
    # the variant found on calibration also passes on test (measured: overlap differs by ~0.01).
    headroom: float = 0.2

    def __post_init__(self) -> None:
        if self.ranking_texts < 1:
            raise ValueError(f"ranking_texts must be at least 1, not {self.ranking_texts}")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"headroom must be in [0, 1), not {self.headroom}")

    def targets(self, gates: Gates) -> Gates:
        def closer(limit: float) -> float:
            return round(1 - (1 - limit) * (1 - self.headroom), 6)

        return gates.model_copy(
            update={
                "min_mean_cosine": closer(gates.min_mean_cosine),
                "min_overlap_at_10": closer(gates.min_overlap_at_10),
                "min_agreement": closer(gates.min_agreement),
            }
        )


MIXED_PRECISION_PRESETS: dict[str, MixedPrecisionConfig] = {
    "int8-mixed-qint8-per-channel": MixedPrecisionConfig(DynamicInt8Config("QInt8", per_channel=True)),
}


def fake_quantize(values: np.ndarray, levels: tuple[int, int], axis: int | None) -> np.ndarray:
    """Round trip through the integers `levels` spans: symmetric about 0 when it includes negatives,
    else asymmetric with 0 exactly representable; one scale per slice along `axis` reduced over, or one
    for the whole tensor."""
    keep = axis is not None
    low_level, high_level = levels
    if low_level < 0:
        scale = np.abs(values).max(axis=axis, keepdims=keep) / high_level
        scale = np.where(scale == 0, 1.0, scale)
        return np.clip(np.round(values / scale), low_level, high_level) * scale
    low = np.minimum(values.min(axis=axis, keepdims=keep), 0)
    high = np.maximum(values.max(axis=axis, keepdims=keep), 0)
    scale = np.where(high > low, (high - low) / high_level, 1.0)
    zero = np.round(-low / scale)
    return (np.clip(np.round(values / scale) + zero, 0, high_level) - zero) * scale


def first_output(model: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0], dtype=np.float32)


@contextmanager
def quantized_alone(model: Any, node: Any, weight: Any, config: MixedPrecisionConfig) -> Iterator[None]:
    """Within the block, `node` alone computes as dynamic int8 would: its weight rounded through int8
    and its activation through the same DynamicQuantizeLinear op ONNX Runtime inserts at run time."""
    from onnx import TensorProto, helper, numpy_helper

    original = TensorProto()
    original.CopyFrom(weight)
    values = numpy_helper.to_array(weight).astype(np.float32)
    axis = 0 if config.int8.per_channel else None
    rounded = fake_quantize(values, config.int8.weight_range(), axis)
    weight.CopyFrom(numpy_helper.from_array(rounded.astype(values.dtype), weight.name))
    activation = node.input[0]
    names = [f"{activation}.{node.name}.{suffix}" for suffix in ("q", "scale", "zero", "dq")]
    quantize = helper.make_node("DynamicQuantizeLinear", [activation], names[:3])
    dequantize = helper.make_node("DequantizeLinear", names[:3], names[3:])
    position = list(model.graph.node).index(node)
    model.graph.node.insert(position, dequantize)
    model.graph.node.insert(position, quantize)
    node.input[0] = names[3]
    try:
        yield
    finally:
        node.input[0] = activation
        model.graph.node.remove(quantize)
        model.graph.node.remove(dequantize)
        weight.CopyFrom(original)


def rank_nodes(model_path: Path, calibration: Calibration, config: MixedPrecisionConfig) -> list[tuple[str, float]]:
    """(node name, relative error of the model's output when that node alone is int8), worst first:
    a node's own error says little; what counts is how much of it survives to the output."""
    import onnx

    model = onnx.load(str(model_path))
    weights = {w.name: w for w in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in WEIGHT_INPUT and n.input[WEIGHT_INPUT[n.op_type]] in weights]
    runtime = calibration.runtime(calibration.reference)
    feeds = runtime.feeds(runtime.token_ids(list(calibration.texts[: config.ranking_texts])))
    reference = first_output(model, feeds)
    errors = {}
    for node in bar(nodes, "rank nodes by int8 sensitivity"):
        with quantized_alone(model, node, weights[node.input[WEIGHT_INPUT[node.op_type]]], config):
            output = first_output(model, feeds)
        errors[node.name] = float(np.linalg.norm(output - reference) / max(float(np.linalg.norm(reference)), 1e-12))
    return sorted(errors.items(), key=lambda item: -item[1])


def fewest_passing(total: int, passes: Callable[[int], bool]) -> int:
    """Smallest k in 0..total with passes(k), assuming passing is monotone in k (more nodes in fp32,
    closer to fp32): tries 0, then total, then bisects. Returns total when nothing passes."""
    if passes(0):
        return 0
    if not passes(total):
        return total
    low, high = 0, total  # passes(low) is false, passes(high) is true
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if passes(middle) else (middle, high)
    return high


def meets_gates(fidelity: Fidelity, gates: Gates) -> bool:
    return not fidelity_failures(fidelity, gates)


@dataclass(frozen=True)
class MixedPrecision:
    config: MixedPrecisionConfig

    def settings(self) -> dict[str, Any]:
        return {
            "precision": "int8+fp32",
            "method": "dynamic, sensitive nodes kept fp32",
            **self.config.int8.settings(),
            "ranking_texts": self.config.ranking_texts,
            "headroom": self.config.headroom,
        }

    def apply(self, job: PassJob) -> None:
        if job.calibration is None:
            raise ValueError("mixed precision needs calibration texts")
        calibration = job.calibration
        ranking = rank_nodes(job.model_in, calibration, self.config)
        embedding = RuntimeSpec.read(job.model_out.parent).task == "feature-extraction"
        reference = FidelityReference(calibration.outputs(calibration.reference, "fp32 calibration outputs"), embedding)
        quantizer = DynamicInt8(self.config.int8)
        targets = self.config.targets(calibration.gates)
        trials: dict[int, Fidelity] = {}

        def trial(kept: int) -> bool:
            folder = job.model_out.parent / f"trial-{kept}"
            folder.mkdir()
            for item in job.model_out.parent.iterdir():
                if item.is_file() and item.name != MODEL_FILE:
                    shutil.copy2(item, folder / item.name)
            quantizer.quantize(job.model_in, folder / MODEL_FILE, [name for name, _ in ranking[:kept]])
            trials[kept] = reference.compare(calibration.outputs(folder, f"int8 with {kept} nodes fp32"))
            return meets_gates(trials[kept], targets)

        kept = fewest_passing(len(ranking), trial)
        # If even all-fp32 nodes miss on calibration, keep that variant: evaluation reports why it fails.
        shutil.move(job.model_out.parent / f"trial-{kept}" / MODEL_FILE, job.model_out)
        for tried in trials:
            shutil.rmtree(job.model_out.parent / f"trial-{tried}")
        record = {
            "ranking": [{"node": name, "relative_error": round(err, 5)} for name, err in ranking],
            "trials": [
                {"kept_fp32": k, **asdict(f), "meets_gates": meets_gates(f, targets)} for k, f in sorted(trials.items())
            ],
            "kept_fp32": [name for name, _ in ranking[:kept]],
            "calibration_texts": len(calibration.texts),
            "targets": targets.model_dump(include={"min_mean_cosine", "min_overlap_at_10", "min_agreement"}),
        }
        (job.model_out.parent / SEARCH_FILE).write_bytes(json_bytes(record))
