"""Labelled text data for evaluation: read, filter to known labels, de-duplicate, split with a seed."""

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
    labels: np.ndarray  # index into EvalConfig.labels


@dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split
    label_names: list[str]
    source: str

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of both splits' texts and labels: cached results keyed on it follow the data."""
        digest = hashlib.sha256()
        for split in (self.train, self.test):
            digest.update("\n".join(split.texts).encode())
            digest.update(split.labels.tobytes())
        digest.update("\n".join(self.label_names).encode())
        return digest.hexdigest()


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(path), encoding="utf-8")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8")
    return path.open(encoding="utf-8", newline="")


def _rows(path: Path) -> Iterator[dict[str, str]]:
    stem = path.name.removesuffix(".bz2").removesuffix(".gz")
    with _open_text(path) as handle:
        if stem.endswith(".jsonl"):
            for line in handle:
                if line.strip():
                    yield json.loads(line)
        else:
            yield from csv.DictReader(handle)


def load_dataset(path: Path, config: EvalConfig, config_path: Path) -> Dataset:
    """Rows whose label is in `config.labels`, each text once (its first row), so no text sits in both
    splits."""
    seen: set[str] = set()
    unique: list[tuple[str, int]] = []
    label_index = {name: i for i, name in enumerate(config.labels)}
    for row in _rows(path):
        if config.text_column not in row or config.label_column not in row:
            raise ConfigError(
                f"{config_path}: field 'eval.text_column'/'eval.label_column': not columns of {path.name} "
                f"(columns: {', '.join(row)})"
            )
        text, label = str(row[config.text_column]).strip(), str(row[config.label_column])
        if label not in label_index or not text or text in seen:
            continue
        seen.add(text)
        unique.append((text, label_index[label]))
    order = np.random.default_rng(config.seed).permutation(len(unique))
    train_idx = order[: config.train_size]
    test_idx = order[config.train_size :]
    if config.test_size is not None:
        test_idx = test_idx[: config.test_size]
    if len(test_idx) == 0 or len(set(unique[i][1] for i in train_idx)) < 2:
        raise ConfigError(
            f"{config_path}: field 'eval.train_size': leaves no test examples or one class "
            f"({len(unique)} usable rows in {path.name})"
        )

    def split(indices: np.ndarray) -> Split:
        return Split([unique[i][0] for i in indices], np.array([unique[i][1] for i in indices], dtype=np.int64))

    return Dataset(split(train_idx), split(test_idx), list(config.labels), path.name)
