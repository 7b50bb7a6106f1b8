"""The explicit artifacts that flow from one stage to the next.

A stage reads the fields earlier stages filled and returns a new BuildState with its own; nothing is
passed through globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cache import ResultCache
from pipeline.config import ModelConfig, ServiceConfig
from pipeline.data import Dataset
from pipeline.fidelity import Fidelity
from pipeline.memory.curve import MemoryCurve
from serve.runtime import Pooling


@dataclass(frozen=True)
class BuildContext:
    """Fixed inputs of one model's run."""

    model: ModelConfig
    config_path: Path
    service: ServiceConfig
    service_path: Path
    work_dir: Path  # build/<model>: exports and candidates, cached by source hash
    artifacts_dir: Path  # artifacts/<model>: approved variants only

    @property
    def max_tokens_per_run(self) -> int:
        return self.service.limits.max_batch * self.service.limits.max_seq_len

    @property
    def share_mb(self) -> float:
        """Peak RSS this model may reach measured alone (see ServiceConfig.shares_mb)."""
        return self.service.share_mb(self.model.name)

    @property
    def results(self) -> ResultCache:
        """Per-candidate evaluations and measurements, keyed by what decides them (see pipeline.cache)."""
        return ResultCache(self.work_dir / "results")


@dataclass(frozen=True)
class SourceModel:
    folder: Path
    weights_sha256: str
    source: dict[str, Any]
    pooling: Pooling | None
    normalize: bool
    labels: tuple[str, ...]
    is_sentence_transformer: bool
    model_type: str
    max_positions: int


@dataclass(frozen=True)
class ExportedModel:
    folder: Path  # model.onnx + tokenizer.json + runtime.json
    validation: dict[str, float]


@dataclass(frozen=True)
class Candidate:
    variant: str
    folder: Path
    settings: dict[str, Any]
    file_mb: float
    search: dict[str, Any] | None = None  # a calibrated pass's ranking and trials (search.json)


@dataclass(frozen=True)
class Evaluation:
    accuracy: dict[str, Any] | None  # metric, reference, value, delta (points), n_test; None without labels
    cosine: dict[str, float] | None  # mean, min against fp32 (embeddings)
    neighbours: dict[str, float] | None  # overlap_at_10 against fp32 (embeddings)
    agreement: float | None  # top-1 agreement with fp32 (classification)
    latency_ms: dict[str, float]  # p50, p95 for one input
    throughput: float  # inputs/s over the test split

    @property
    def fidelity(self) -> Fidelity:
        return Fidelity(
            cosine_mean=self.cosine["mean"] if self.cosine else None,
            cosine_min=self.cosine["min"] if self.cosine else None,
            overlap_at_10=self.neighbours["overlap_at_10"] if self.neighbours else None,
            agreement=self.agreement,
        )


@dataclass(frozen=True)
class Measurement:
    """Peak RSS (VmHWM of a fresh probe process) at the micro-batch the service will run:
    `batch` full-length rows of `seq_len` tokens, under the session options chosen by measurement.

    A candidate that misses a fidelity gate is measured once, at the worst case, for the report;
    `curve` and `predicted_peak_mb` are then None."""

    peak_rss_mb: float  # the proof: model runs at `batch` rows, then the request path's hostile bodies
    model_run_peak_mb: float  # model runs alone at `batch` rows (what the curve predicts)
    request_path: dict[str, Any] | None  # the proof's bodies and the limits they prove; None unless measured
    ru_maxrss_mb: float
    rss_after_imports_mb: float
    rss_after_load_mb: float
    batch: int
    seq_len: int
    worst_case_peak_mb: float  # at max_batch × max_seq_len in one run
    predicted_peak_mb: float | None  # the fitted curve's prediction at batch × seq_len
    curve: MemoryCurve | None
    session_variant: str
    session_options: dict[str, Any]
    session_trials: dict[str, float]  # session variant -> worst-case peak MB
    session_timings: dict[str, dict[str, dict[str, Any]]]  # variant -> worst_case / one_text -> Timing JSON
    # rows per run -> worst-case Timing JSON, behind the micro-batch by speed (empty: not timed)
    micro_batch_timings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def max_tokens_per_run(self) -> int:
        return self.batch * self.seq_len

    @property
    def prediction_error(self) -> float | None:
        if self.predicted_peak_mb is None:
            return None
        return (self.predicted_peak_mb - self.model_run_peak_mb) / self.model_run_peak_mb


@dataclass(frozen=True)
class Verdict:
    variant: str
    failures: tuple[str, ...]
    chosen: bool = False
    note: str = ""  # for a passing candidate: why it was chosen or which criterion set it aside
    decides: bool = False  # a criterion of the ranking measured the others against this one

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class BuildState:
    dataset: Dataset | None = None
    source: SourceModel | None = None
    exported: ExportedModel | None = None
    candidates: tuple[Candidate, ...] = ()
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    measurements: dict[str, Measurement] = field(default_factory=dict)
    verdicts: tuple[Verdict, ...] = ()
    approved: Path | None = None  # the new variant folder, when one was approved

    def require(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None or value == () or value == {}:
            raise RuntimeError(f"stage order error: {name!r} has not been produced yet")
        return value
