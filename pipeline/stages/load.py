"""Accept a model folder only if it is safe to load: safetensors weights, no remote code, fast tokenizer."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.config import SourceConfig
from pipeline.sources import model_folder
from pipeline.state import BuildContext, BuildState, SourceModel
from serve.artifacts import sha256_file
from serve.config import ConfigError
from serve.runtime import Pooling

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
POOLING_MODES: dict[str, Pooling] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


class ModelFolderError(ConfigError):
    """A model folder memfit refuses to load."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{path}: unreadable JSON ({exc})") from None


def check_folder(folder: Path) -> list[Path]:
    """The safetensors weight files of `folder`, after refusing pickle-only or remote-code models."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFolderError(f"{folder}: not a Hugging Face model folder (no config.json)")
    config = _read_json(config_path)
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
    for module in _read_json(modules_path):
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            pooling_config = _read_json(folder / module.get("path", "") / "config.json")
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
class LoadStage:
    source: SourceConfig
    name: str = "load"

    def run(self, context: BuildContext, state: BuildState) -> BuildState:
        cache = context.work_dir.parent / "sources"
        folder, described = model_folder(self.source, context.config_path, cache, state.dataset)
        weights = check_folder(folder)
        digest = hashlib.sha256()
        for path in weights:
            digest.update(sha256_file(path).encode())
        config = _read_json(folder / "config.json")
        is_st, pooling, normalize = sentence_transformer_head(folder)
        labels: tuple[str, ...] = ()
        if context.model.task == "text-classification":
            id2label = config.get("id2label") or {}
            labels = tuple(id2label[str(i)] for i in range(len(id2label)))
        elif pooling is None:
            pooling = "mean"
        max_positions = int(config.get("max_position_embeddings", 512))
        limit = context.service.limits.max_seq_len
        # Models with learned absolute positions reserve a couple of slots (RoBERTa/MPNet padding offset).
        usable = max_positions - 2 if config.get("model_type") in {"roberta", "xlm-roberta", "mpnet"} else max_positions
        if limit > usable:
            raise ConfigError(
                f"{context.service_path}: field 'limits.max_seq_len': {limit} is more than the {usable} tokens "
                f"{context.model.name} accepts"
            )
        source = {**described, "weights_sha256": digest.hexdigest(), "weights": [p.name for p in weights]}
        return replace(
            state,
            source=SourceModel(
                folder=folder,
                weights_sha256=digest.hexdigest(),
                source=source,
                pooling=pooling,
                normalize=normalize,
                labels=labels,
                is_sentence_transformer=is_st,
                model_type=str(config.get("model_type", "")),
                max_positions=max_positions,
            ),
        )
