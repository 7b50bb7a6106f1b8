"""Text data for evaluation: read, filter to known labels (when labelled), de-duplicate, split with a seed."""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.config import EvalConfig
from serve.config import ConfigError


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: np.ndarray | None  # index into EvalConfig.labels; None for unlabelled data

    @property
    def label_ids(self) -> np.ndarray:
        """The labels, for the users of labels (the config validators keep unlabelled data from them)."""
        if self.labels is None:
            raise ValueError("unlabelled data has no labels")
        return self.labels


@dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split
    label_names: list[str]  # empty for unlabelled data
    source: str

    @property
    def labelled(self) -> bool:
        return bool(self.label_names)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of both splits' texts and labels: cached results keyed on it follow the data."""
        digest = hashlib.sha256()
        for split in (self.train, self.test):
            digest.update("\n".join(split.texts).encode())
            if split.labels is not None:
                digest.update(split.labels.tobytes())
        digest.update("\n".join(self.label_names).encode())
        return digest.hexdigest()


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(path), encoding="utf-8")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8")
    return path.open(encoding="utf-8", newline="")


def read_rows(path: Path) -> Iterator[dict[str, str]]:
    """The rows of a CSV or JSONL file (optionally .bz2/.gz)."""
    stem = path.name.removesuffix(".bz2").removesuffix(".gz")
    with _open_text(path) as handle:
        if stem.endswith(".jsonl"):
            for line in handle:
                if line.strip():
                    yield json.loads(line)
        else:
            yield from csv.DictReader(handle)


def load_dataset(path: Path, config: EvalConfig, config_path: Path) -> Dataset:
    """Rows whose label is in `config.labels` (every row, for unlabelled data), each text once (its first
    row), so no text sits in both splits."""
    seen: set[str] = set()
    unique: list[tuple[str, int]] = []
    label_names = config.labels or []
    label_index = {name: i for i, name in enumerate(label_names)}
    columns = [config.text_column] if config.label_column is None else [config.text_column, config.label_column]
    for row in read_rows(path):
        if not isinstance(row, dict) or any(column not in row for column in columns):
            fields = "eval.text_column" if config.label_column is None else "eval.text_column'/'eval.label_column"
            found = ", ".join(row) if isinstance(row, dict) else "not a mapping"
            raise ConfigError(f"{config_path}: field '{fields}': not columns of {path.name} (columns: {found})")
        text = str(row[config.text_column]).strip()
        label = 0 if config.label_column is None else label_index.get(str(row[config.label_column]), -1)
        if label < 0 or not text or text in seen:
            continue
        seen.add(text)
        unique.append((text, label))
    order = np.random.default_rng(config.seed).permutation(len(unique))
    train_idx = order[: config.train_size]
    test_idx = order[config.train_size :]
    if config.test_size is not None:
        test_idx = test_idx[: config.test_size]
    one_class = config.labels is not None and len(set(unique[i][1] for i in train_idx)) < 2
    if len(test_idx) == 0 or one_class:
        raise ConfigError(
            f"{config_path}: field 'eval.train_size': leaves no test examples or one class "
            f"({len(unique)} usable rows in {path.name})"
        )

    def split(indices: np.ndarray) -> Split:
        labels = None if config.labels is None else np.array([unique[i][1] for i in indices], dtype=np.int64)
        return Split([unique[i][0] for i in indices], labels)

    return Dataset(split(train_idx), split(test_idx), label_names, path.name)
