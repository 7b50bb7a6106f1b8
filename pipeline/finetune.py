"""Fine-tune a sequence classifier from a base model on the evaluation data's train split.

Seeded and cached: the output folder is keyed by the base weights, the settings and the train data,
written to a temp folder and renamed into place. It is saved with save_pretrained + safetensors and a
fast tokenizer, so the pipeline then treats it like any user's classifier. The test split is never seen.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_dir
from pipeline.config import FinetuneConfig
from pipeline.data import Split
from pipeline.progress import bar, step
from serve.artifacts import sha256_file

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
COMPLETE = ".complete"


def cache_key(base: Path, config: FinetuneConfig, train: Split, labels: list[str]) -> str:
    digest = hashlib.sha256()
    for weights in sorted(base.glob("*.safetensors")):
        digest.update(sha256_file(weights).encode())
    digest.update(config.model_dump_json(exclude={"base"}).encode())
    digest.update(json.dumps([train.texts, train.label_ids.tolist(), labels]).encode())
    return digest.hexdigest()[:16]


def finetuned_folder(base: Path, config: FinetuneConfig, train: Split, labels: list[str], cache_root: Path) -> Path:
    target = cache_root / f"finetune-{cache_key(base, config, train, labels)}"
    if not (target / COMPLETE).is_file():
        with atomic_dir(target) as tmp, step(f"fine-tune a {len(labels)}-class classifier on {len(train.texts)} texts"):
            train_classifier(base, config, train, labels, tmp)
            (tmp / COMPLETE).write_text(config.model_dump_json(exclude={"base"}))
    return target


def train_classifier(base: Path, config: FinetuneConfig, train: Split, labels: list[str], out: Path) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    torch.manual_seed(config.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        use_safetensors=True,
    )
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=config.max_seq_len)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]") or 0, pad_token="[PAD]")
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = -(-len(train.texts) // config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, steps_per_epoch // 10, steps_per_epoch * config.epochs)
    model.train()
    for epoch in range(config.epochs):
        order = rng.permutation(len(train.texts))
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        for indices in bar(batches, f"fine-tune epoch {epoch + 1}/{config.epochs}"):
            encodings = tokenizer.encode_batch([train.texts[i] for i in indices])
            inputs = {
                "input_ids": torch.tensor([e.ids for e in encodings]),
                "attention_mask": torch.tensor([e.attention_mask for e in encodings]),
            }
            loss = model(**inputs, labels=torch.from_numpy(train.label_ids[indices])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
