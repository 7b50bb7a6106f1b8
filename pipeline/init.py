"""`memfit init SOURCE --name NAME`: a model folder or installed package in; a validated model config out,
added to a service config.

Everything written is read from the model's own files (pipeline/model_folder.py): the task from
`architectures`, the labels from `id2label`, pooling and normalization from sentence-transformers'
modules, the sequence length from the tokenizer and model configs. Without labelled data the gates are
fidelity to fp32 alone, on texts memfit ships. Nothing is written until both files validate, and then each
is renamed into place; an existing model config is never overwritten.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.atomic import write_bytes_atomic
from pipeline.config import DEFAULT_CANDIDATES, SHIPPED_TEXTS, EvalConfig, Gates, ModelConfig
from pipeline.data import Dataset, load_dataset, read_rows
from pipeline.model_folder import FolderFacts, inspect_folder
from pipeline.sources import data_path, package_root
from pipeline.split_zip import PART, split_zip_folder
from serve.config import ConfigError, ServiceConfig, format_validation_error, load_service_config, resolve

MAX_CLASSES = 100  # a label column with more distinct values is not a set of classes
TRAIN_SIZE: int = EvalConfig.model_fields["train_size"].default  # rows fitting the probe at most
SHIPPED_TRAIN_SIZE = 800  # shipped texts that calibrate searches; the other 1,600 score
MODELS_LIST = re.compile(r"^models:[ \t]*(#.*)?$")


class InitError(ConfigError):
    """What `memfit init` refuses, in one line."""


@dataclass(frozen=True)
class Located:
    folder: Path
    source: dict[str, Any]  # the model config's `source`
    origin: str  # where the folder came from, for the summary


def distribution(name: str) -> importlib.metadata.Distribution | None:
    """An installed distribution by its own name, or by the name of a module it ships."""
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        owners = importlib.metadata.packages_distributions().get(name.split(".")[0], [])
        return importlib.metadata.distribution(owners[0]) if owners else None


def shipped_folders(files: list[importlib.metadata.PackagePath]) -> Iterator[PurePosixPath]:
    """Folders of a distribution holding both config.json and tokenizer.json, shallowest first."""
    names = {PurePosixPath(str(f)) for f in files}
    folders = {p.parent for p in names if p.name == "config.json" and p.parent / "tokenizer.json" in names}
    yield from sorted(folders, key=lambda p: (len(p.parts), str(p)))


def locate(source: str, model_config: Path, cache_root: Path) -> Located:
    """The model folder SOURCE names: a folder, or an installed package shipping one (as files or a zip)."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path.resolve()
        return Located(folder, {"path": relative_path(folder, model_config.parent)}, f"folder {folder}")
    dist = distribution(source)
    if dist is None:
        raise InitError(f"{source}: neither a folder nor an installed package (pip install it first)")
    label = f"{dist.metadata['Name']}=={dist.version}"
    files = list(dist.files or [])
    folder_in_package = next(shipped_folders(files), None)
    if folder_in_package is not None and len(folder_in_package.parts) > 1:
        package, subdir = folder_in_package.parts[0], str(PurePosixPath(*folder_in_package.parts[1:]))
        folder = package_root(package, model_config, "source.package") / subdir
        source_config = {"package": package, "subdir": subdir, "requires": [label]}
        return Located(folder, source_config, f"{label}, folder {folder_in_package}")
    zips = [f for f in files if PART.search(f.name)]
    if len(zips) == 1 and zips[0].name.endswith(".zip"):
        name = str(dist.metadata["Name"])
        folder, _ = split_zip_folder([name], cache_root, model_config)
        return Located(folder, {"split_zip": [name], "requires": [label]}, f"{label}, {zips[0].name}")
    if zips:
        raise InitError(
            f"{source}: ships {', '.join(z.name for z in zips)}: parts of a split zip; list every part's "
            "distribution under source.split_zip by hand"
        )
    raise InitError(f"{source}: {label} ships no model folder (config.json beside tokenizer.json) and no zip of one")


def relative_path(target: Path, base: Path) -> str:
    """`target` relative to `base` when they share a folder below the filesystem root, else absolute."""
    target, base = target.resolve(), base.resolve()
    for ups, parent in enumerate([base, *base.parents]):
        if target.is_relative_to(parent) and parent != Path(parent.anchor):
            return str(Path(*[".."] * ups, target.relative_to(parent)))
    return str(target)


def label_values(path: Path, text_column: str, label_column: str) -> list[str]:
    """The distinct labels of a data file, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in read_rows(path):
        if not isinstance(row, dict) or label_column not in row or text_column not in row:
            columns = ", ".join(row) if isinstance(row, dict) else "rows are not objects"
            raise InitError(f"{path}: no column {label_column!r} or {text_column!r} ({columns})")
        seen.setdefault(str(row[label_column]), None)
        if len(seen) > MAX_CLASSES:
            raise InitError(f"{path}: column {label_column!r} has over {MAX_CLASSES} distinct values: not classes")
    return list(seen)


def eval_section(
    facts: FolderFacts, model_config: Path, data: Path | None, text_column: str, label_column: str | None
) -> dict[str, Any]:
    """The `eval` of the new config: the user's data (labelled or not), or the shipped texts."""
    if data is None:
        return {
            "data": SHIPPED_TEXTS.model_dump(exclude_none=True),
            "text_column": "text",
            "train_size": SHIPPED_TRAIN_SIZE,
            "seed": 0,
        }
    if not data.is_file():
        raise InitError(f"--data {data}: not a file")
    section: dict[str, Any] = {"data": {"path": relative_path(data, model_config.parent)}, "text_column": text_column}
    rows = sum(1 for _ in read_rows(data))
    if label_column is not None:
        labels = label_values(data, text_column, label_column)
        unknown = [name for name in labels if facts.labels and name not in facts.labels]
        if unknown:
            raise InitError(
                f"--label-column {label_column}: {unknown[0]!r} is not one of the model's labels "
                f"({', '.join(facts.labels)})"
            )
        section |= {"label_column": label_column, "labels": labels}
    section |= {"train_size": max(1, min(TRAIN_SIZE, rows // 2)), "seed": 0}
    return section


def gates_for(task: str, labelled: bool) -> dict[str, Any]:
    """The default gates that apply, spelled out so the user sees what the approval is held to."""
    defaults = Gates()
    metric = {"max_metric_drop_pt": defaults.max_metric_drop_pt} if labelled else {}
    if task == "feature-extraction":
        return {**metric, "min_mean_cosine": defaults.min_mean_cosine, "min_overlap_at_10": defaults.min_overlap_at_10}
    return {**metric, "min_agreement": defaults.min_agreement}


def describe(facts: FolderFacts) -> str:
    if facts.task == "text-classification":
        head = f"classifier over {', '.join(facts.labels)}"
    else:
        pooling = facts.pooling or "mean (not stated; the default)"
        head = f"embeddings, {pooling} pooling{', normalized' if facts.normalize else ''}"
    return f"{facts.model_type}, {facts.task}: {head}; up to {facts.trained_seq_len} tokens ({facts.seq_len_from})"


def model_yaml(name: str, facts: FolderFacts, located: Located, evaluation: dict[str, Any], command: str) -> str:
    config = {
        "name": name,
        "task": facts.task,
        "source": located.source,
        "eval": evaluation,
        "gates": gates_for(facts.task, labelled="label_column" in evaluation),
        "candidates": list(DEFAULT_CANDIDATES),
        "objective": "lowest_latency",
    }
    header = [
        f"# {name}: written by `{command}`.",
        f"# From {located.origin}.",
        f"# Read from the model folder: {describe(facts)}.",
    ]
    if "label_column" not in evaluation:
        header.append("# No labelled data: the gates are fidelity to fp32 alone.")
    return "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def service_yaml(name: str, facts: FolderFacts) -> str:
    defaults = ServiceConfig(models=[f"models/{name}.yaml"])
    config = {
        "budget_mb": defaults.budget_mb,
        "headroom_mb": defaults.headroom_mb,
        "models": defaults.models,
        "limits": {"max_batch": defaults.limits.max_batch, "max_seq_len": facts.trained_seq_len},
        "artifacts_dir": f"../artifacts-{name}",
    }
    header = (
        f"# The service for {name}, written by `memfit init`: one gunicorn worker within budget_mb.\n"
        "# Every field can be overridden by an env var (README: MEMORY_BUDGET_MB, MAX_BATCH, MAX_SEQ_LEN, ...).\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def with_model(text: str, entry: str, path: Path) -> str:
    """The service config's text with `entry` appended to its block-style `models:` list, comments kept."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if MODELS_LIST.match(line)), None)
    if start is None:
        raise InitError(
            f"{path}: field 'models': not a block list ('models:' then '  - ...' lines); add {entry} by hand"
        )
    last, indent = start, "  "
    for index in range(start + 1, len(lines)):
        stripped = lines[index].lstrip()
        if stripped.startswith("-"):
            last, indent = index, lines[index][: len(lines[index]) - len(stripped)]
        elif stripped.strip() and not stripped.startswith("#"):
            break
    if not lines[last].endswith("\n"):
        lines[last] += "\n"
    lines.insert(last + 1, f"{indent}- {entry}\n")
    return "".join(lines)


def validated_service(text: str, path: Path) -> ServiceConfig:
    try:
        return ServiceConfig.model_validate(yaml.safe_load(text), context={"config_dir": path.parent})
    except ValidationError as exc:
        raise InitError(format_validation_error(path, exc, ServiceConfig)) from None


def init_model(
    source: str,
    name: str,
    service_path: Path | None = None,
    data: Path | None = None,
    text_column: str = "text",
    label_column: str | None = None,
    command: str = "memfit init",
) -> Initialized:
    """Write configs/models/NAME.yaml beside the service config and add it there (creating the service
    config when it does not exist); returns the summary lines."""
    service_path = service_path or Path("configs") / f"service-{name}.yaml"
    model_path = service_path.parent / "models" / f"{name}.yaml"
    entry = f"models/{name}.yaml"
    if model_path.exists():
        raise InitError(f"{model_path}: exists; memfit init never overwrites a model config (pick another --name)")
    existing = service_path.is_file()
    if existing:
        service, _ = load_service_config(service_path)
        if entry in service.models:
            raise InitError(f"{service_path}: field 'models': already lists {entry}")
    else:
        service = ServiceConfig(models=[entry])
    cache_root = resolve(service_path, service.artifacts_dir).parent / "build" / "sources"
    located = locate(source, model_path, cache_root)
    facts = inspect_folder(located.folder)
    if existing and service.limits.max_seq_len > facts.max_seq_len:
        raise InitError(
            f"{service_path}: field 'limits.max_seq_len': {service.limits.max_seq_len} is more than the "
            f"{facts.max_seq_len} tokens {name} accepts; lower it or pass another --service"
        )
    evaluation = eval_section(facts, model_path, data, text_column, label_column)
    text = model_yaml(name, facts, located, evaluation, command)
    try:
        config = ModelConfig.model_validate(yaml.safe_load(text), context={"config_dir": model_path.parent})
    except ValidationError as exc:
        raise InitError(format_validation_error(model_path, exc, ModelConfig)) from None
    # The user's file as given: the config's relative path goes through folders not created yet.
    texts = data.resolve() if data is not None else data_path(config.eval.data, model_path)
    dataset = load_dataset(texts, config.eval, model_path)
    service_text = with_model(service_path.read_text(), entry, service_path) if existing else service_yaml(name, facts)
    validated_service(service_text, service_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(model_path, text.encode())
    write_bytes_atomic(service_path, service_text.encode())
    service_max_seq_len = service.limits.max_seq_len if existing else facts.trained_seq_len
    return Initialized(
        name, facts, located, config.eval, dataset, model_path, service_path, existing, service_max_seq_len
    )


@dataclass(frozen=True)
class Initialized:
    """What `memfit init` read and wrote."""

    name: str
    facts: FolderFacts
    located: Located
    evaluation: EvalConfig
    dataset: Dataset
    model_path: Path
    service_path: Path
    added: bool  # to an existing service config (else created)
    service_max_seq_len: int

    def notes(self) -> list[str]:
        if self.service_max_seq_len <= self.facts.trained_seq_len:
            return []
        return [
            f"{self.name}: note: the service accepts {self.service_max_seq_len} tokens per input, more than the "
            f"{self.facts.trained_seq_len} {self.name} is meant for ({self.facts.seq_len_from})"
        ]

    def summary(self) -> list[str]:
        gates = gates_for(self.facts.task, self.evaluation.labelled)
        held_to = ", ".join(f"{key} {value}" for key, value in gates.items())
        labels = self.evaluation.labels
        judged = f"labelled ({', '.join(labels)})" if labels else "fidelity only (no labels)"
        shipped = " (shipped with memfit)" if self.evaluation.data == SHIPPED_TEXTS else ""
        texts = f"{len(self.dataset.test.texts)} test texts of {self.dataset.source}{shipped}"
        return [
            f"{self.name}: {self.located.origin}",
            f"{self.name}: {describe(self.facts)}",
            f"{self.name}: judged on {texts}, {judged}: {held_to}",
            *self.notes(),
            f"wrote {self.model_path}; {'added it to' if self.added else 'created'} {self.service_path}",
            f"next: memfit optimize --service {self.service_path}",
        ]
