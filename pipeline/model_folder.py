"""What a Hugging Face model folder is, read from its files alone: refused when it is unsafe or not a model
memfit serves, described otherwise (task, labels, pooling, normalization, sequence lengths).

The load stage and `memfit init` both read a folder through here, so they accept and refuse the same ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.config import ConfigError
from serve.runtime import Pooling

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
POOLING_MODES: dict[str, Pooling] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
# Encoder families whose export, candidates and service are tested end to end (tests/test_init.py).
SUPPORTED_MODEL_TYPES = ("bert", "distilbert", "mpnet", "roberta", "xlm-roberta")
# Learned absolute positions that reserve slots for the padding offset (RoBERTa-style position ids).
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "mpnet": 2}
# config.json `architectures` suffixes per task: an encoder with any of these heads embeds (the head is
# dropped at export); a sequence-classification head classifies.
EMBEDDING_HEADS = ("Model", "ForMaskedLM", "ForPreTraining")
CLASSIFIER_HEADS = ("ForSequenceClassification",)
UNBOUNDED_TOKENIZER = 100_000  # tokenizer_config.json's model_max_length when the tokenizer sets none


class ModelFolderError(ConfigError):
    """A model folder memfit refuses to load."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{path}: unreadable JSON ({exc})") from None


def check_folder(folder: Path) -> list[Path]:
    """The safetensors weight files of `folder`, after refusing pickle-only or remote-code models."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFolderError(f"{folder}: not a Hugging Face model folder (no config.json)")
    config = read_json(config_path)
    if "auto_map" in config or any(folder.glob("*.py")):
        raise ModelFolderError(
            f"{folder}: model requires trust_remote_code (custom code in auto_map/*.py); memfit runs no remote code"
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
        raise ModelFolderError(
            f"{folder}: {found}; memfit loads safetensors only "
            "(re-save with save_pretrained(..., safe_serialization=True))"
        )
    if not (folder / "tokenizer.json").is_file():
        raise ModelFolderError(f"{folder}: no tokenizer.json; memfit needs a fast (tokenizers) tokenizer")
    return weights


def sentence_transformer_head(folder: Path) -> tuple[bool, Pooling | None, bool]:
    """(is a sentence-transformers model, pooling mode, normalizes) from modules.json and 1_Pooling."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return False, None, False
    pooling: Pooling | None = None
    normalize = False
    for module in read_json(modules_path):
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            pooling_config = read_json(folder / module.get("path", "") / "config.json")
            modes = [mode for key, mode in POOLING_MODES.items() if pooling_config.get(key)]
            if len(modes) != 1:
                raise ModelFolderError(f"{folder}: pooling config must enable exactly one supported mode")
            pooling = modes[0]
        elif kind.endswith("Normalize"):
            normalize = True
        elif not kind.endswith("Transformer"):
            raise ModelFolderError(f"{folder}: sentence-transformers module {kind!r} is not supported")
    return True, pooling, normalize


@dataclass(frozen=True)
class FolderFacts:
    """A model folder as memfit serves it."""

    weights: tuple[Path, ...]
    model_type: str
    task: str  # the task its architecture implies: "feature-extraction" or "text-classification"
    labels: tuple[str, ...]  # id2label in id order (classifiers)
    is_sentence_transformer: bool
    pooling: Pooling | None  # from 1_Pooling; None when the folder does not say
    normalize: bool
    max_positions: int  # max_position_embeddings
    max_seq_len: int  # the most tokens an input may have: positions less any padding offset
    trained_seq_len: int  # the length the model is meant for: max_seq_len, or less if its tokenizer says so
    seq_len_from: str  # the file trained_seq_len comes from


def task_of(folder: Path, architectures: list[str]) -> str:
    if any(a.endswith(CLASSIFIER_HEADS) for a in architectures):
        return "text-classification"
    if not architectures or any(a.endswith(EMBEDDING_HEADS) for a in architectures):
        return "feature-extraction"
    raise ModelFolderError(
        f"{folder}: architecture {architectures[0]} has a task memfit does not serve; supported: feature "
        f"extraction (*{', *'.join(EMBEDDING_HEADS)}, sentence-transformers) and text classification "
        f"(*{CLASSIFIER_HEADS[0]})"
    )


def inspect_folder(folder: Path) -> FolderFacts:
    """Everything memfit reads from a model folder, refusing (ModelFolderError, one line) what it cannot serve."""
    weights = check_folder(folder)
    config = read_json(folder / "config.json")
    model_type = str(config.get("model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelFolderError(
            f"{folder}: model type {model_type or '(none)'!r} is not supported; memfit supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    task = task_of(folder, list(config.get("architectures") or []))
    id2label = config.get("id2label") or {}
    labels = tuple(str(id2label.get(str(i), id2label.get(i, ""))) for i in range(len(id2label)))
    if task == "text-classification" and (len(labels) < 2 or "" in labels):
        raise ModelFolderError(f"{folder}: a classifier needs id2label in config.json with ids 0..n-1 (n ≥ 2)")
    is_st, pooling, normalize = sentence_transformer_head(folder)
    max_positions = int(config.get("max_position_embeddings", 512))
    max_seq_len = max_positions - POSITION_OFFSET.get(model_type, 0)
    trained, source = max_seq_len, "config.json"
    declared = [
        ("tokenizer_config.json", "model_max_length"),
        ("sentence_bert_config.json", "max_seq_length"),
    ]
    for name, key in declared:
        value = read_json(folder / name).get(key) if (folder / name).is_file() else None
        if isinstance(value, int | float) and 0 < value < min(trained + 1, UNBOUNDED_TOKENIZER):
            trained, source = int(value), name
    return FolderFacts(
        weights=tuple(weights),
        model_type=model_type,
        task=task,
        labels=labels if task == "text-classification" else (),
        is_sentence_transformer=is_st,
        pooling=pooling,
        normalize=normalize,
        max_positions=max_positions,
        max_seq_len=max_seq_len,
        trained_seq_len=trained,
        seq_len_from=source,
    )
