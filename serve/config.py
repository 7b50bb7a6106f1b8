"""YAML configs validated on load; every error names the file, the field and what is allowed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

Model = TypeVar("Model", bound=BaseModel)
SharedWeights = Literal["auto", "require", "private"]


class ConfigError(Exception):
    """A config (or input folder) that cannot be used; the CLI exits 2 with this one-line message."""

    exit_code = 2


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _describe(error: dict[str, Any], model_cls: type[BaseModel]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _section_fields(model_cls, error["loc"][:-1])
        return f"unknown key; allowed keys: {', '.join(parent)}" if parent else "unknown key"
    if kind == "missing":
        return "is required"
    message = str(error["msg"]).removeprefix("Value error, ").replace("Input should be", "must be")
    shown = error.get("input")
    return message if isinstance(shown, dict) else f"{message} (got {shown!r})"


def _section_fields(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section at `loc`, to tell the user what an unknown key could have been."""
    current: Any = model_cls
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        current = candidates[0]
    return sorted(getattr(current, "model_fields", {}))


def format_validation_error(path: Path, error: ValidationError, model_cls: type[BaseModel]) -> str:
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"] if not str(p).startswith("function-")]
    field = ".".join(loc) or "<top level>"
    return f"{path}: field '{field}': {_describe(dict(first), model_cls)}"


def load_config(path: str | Path, model_cls: type[Model]) -> Model:
    """Parse `path` as YAML and validate it as `model_cls`, raising ConfigError with one line on failure."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: field '<top level>': must be a mapping of keys to values")
    try:
        return model_cls.model_validate(data, context={"config_dir": path.parent})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc, model_cls)) from None


class SessionSettings(StrictModel):
    """ONNX Runtime session options that change memory and speed: configured per model, varied and
    measured per candidate by the build, recorded in the manifest, and used by the service."""

    intra_op_num_threads: int = Field(2, ge=0, le=64)
    inter_op_num_threads: int = Field(1, ge=0, le=64)
    enable_cpu_mem_arena: bool = True
    enable_mem_pattern: bool = False
    disable_prepacking: bool = False


class Limits(StrictModel):
    """Request limits; the worst-case input the pipeline measures is max_batch × max_seq_len, and the
    worst-case body is max_body_bytes in its nastiest forms (see serve/probe.py)."""

    max_batch: int = Field(32, gt=0, le=4096)
    max_seq_len: int = Field(128, gt=0, le=8192)
    max_body_bytes: int = Field(1_048_576, gt=0, le=64 * 1_048_576)
    # Characters per input before tokenizing (None: max_seq_len × the most characters one token of the
    # model's tokenizer covers) and per request (None: max_batch × max_input_chars).
    max_input_chars: int | None = Field(None, gt=0)
    max_request_chars: int | None = Field(None, gt=0)
    # Tokens per session run, below what each approval proves (None: as proven). Fewer tokens per run,
    # less activation memory per worker: the planner lowers it so that more workers fit.
    max_tokens_per_run: int | None = Field(None, gt=0)
    truncate: bool = False


class ServiceConfig(StrictModel):
    """configs/service.yaml: which models one worker hosts together and within what budget."""

    budget_mb: float = Field(512, gt=0)
    headroom_mb: float = Field(48, ge=0)
    models: list[str] = Field(min_length=1)
    # Peak RSS (MB) a model may reach measured alone, runtime floor included, by model name; a model
    # not listed gets (budget_mb - headroom_mb) / number of models. The whole-service fit checks the sum.
    shares_mb: dict[str, float] = Field(default_factory=dict)
    limits: Limits = Limits()
    # Requests one worker reads at once (gunicorn gthread threads); inference runs one at a time, so
    # the rest hold at most their bodies while they wait. Part of what the build proves.
    threads: int = Field(16, ge=1, le=256)
    # The most workers the build's whole-service fit measures (1, 2, … up to this), and so the most that
    # WORKERS=auto and the start-up check allow. Each count is a gunicorn run of the build: a service that
    # will only ever run one worker may set 1. Four: a 2-core host gains nothing from more CPU-bound workers.
    fit_max_workers: int = Field(4, ge=1, le=64)
    # ONNX Runtime threads per session run, at most what the approval measured (None: as approved).
    # gunicorn sets it to the cores divided by the workers.
    intra_op_threads: int | None = Field(None, ge=1, le=64)
    # auto: memory-map the prepacked weights where they were built for this runtime and CPU, else load the
    # portable model.onnx and say so; require: refuse a model whose prepacked weights cannot load;
    # private: always the portable model (each worker its own copy).
    shared_weights: SharedWeights = "auto"
    # Serve pending approvals where a model has one: what `memfit optimize` measures before publishing.
    pending_approvals: bool = False
    artifacts_dir: str = "../artifacts"

    @field_validator("headroom_mb")
    @classmethod
    def _headroom_below_budget(cls, value: float, info: ValidationInfo) -> float:
        budget = info.data.get("budget_mb")
        if budget is not None and value >= budget:
            raise ValueError(f"must be smaller than budget_mb ({budget:g})")
        return value

    @field_validator("shares_mb")
    @classmethod
    def _positive_shares(cls, shares: dict[str, float]) -> dict[str, float]:
        bad = [name for name, share in shares.items() if share <= 0]
        if bad:
            raise ValueError(f"share of {bad[0]!r} must be more than 0 MB")
        return shares

    def share_mb(self, model: str) -> float:
        """Peak RSS `model` may use when measured alone: its configured share, else an even split of
        the budget less headroom."""
        return self.shares_mb.get(model, (self.budget_mb - self.headroom_mb) / len(self.models))


def load_service_config(path: str | Path) -> tuple[ServiceConfig, Path]:
    """The service config with env-var overrides applied (MEMORY_BUDGET_MB, MAX_BATCH, ...)."""
    path = Path(path)
    config = load_config(path, ServiceConfig)
    return apply_env_overrides(config, path), path


ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "MEMORY_BUDGET_MB": ("budget_mb",),
    "HEADROOM_MB": ("headroom_mb",),
    "MAX_BATCH": ("limits", "max_batch"),
    "MAX_SEQ_LEN": ("limits", "max_seq_len"),
    "MAX_BODY_BYTES": ("limits", "max_body_bytes"),
    "MAX_INPUT_CHARS": ("limits", "max_input_chars"),
    "MAX_REQUEST_CHARS": ("limits", "max_request_chars"),
    "MAX_TOKENS_PER_RUN": ("limits", "max_tokens_per_run"),
    "THREADS": ("threads",),
    "FIT_MAX_WORKERS": ("fit_max_workers",),
    "INTRA_OP_THREADS": ("intra_op_threads",),
    "SHARED_WEIGHTS": ("shared_weights",),
    "PENDING_APPROVALS": ("pending_approvals",),
    "TRUNCATE": ("limits", "truncate"),
    "ARTIFACTS_DIR": ("artifacts_dir",),
}


def apply_env_overrides(config: ServiceConfig, path: Path) -> ServiceConfig:
    data = config.model_dump()
    changed = False
    for env, keys in ENV_OVERRIDES.items():
        raw = os.environ.get(env)
        if raw is None or raw == "":
            continue
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = yaml.safe_load(raw)
        changed = True
    if not changed:
        return config
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(Path(f"{path} (with env overrides)"), exc, ServiceConfig)) from None


def resolve(base: Path, relative: str) -> Path:
    """A path from a config, relative to the config file's folder unless absolute."""
    candidate = Path(relative).expanduser()
    return candidate if candidate.is_absolute() else (base.parent / candidate)


def model_names(config: ServiceConfig, path: Path) -> list[str]:
    """The `name` of each model config the service lists (the service needs nothing else from them)."""
    names = []
    for index, entry in enumerate(config.models):
        model_path = resolve(path, entry)
        try:
            data = yaml.safe_load(model_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: field 'models.{index}': cannot read {model_path} ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ConfigError(f"{model_path}: field 'name': is required")
        names.append(data["name"])
    return names
