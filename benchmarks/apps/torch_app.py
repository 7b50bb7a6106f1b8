"""The setup that dies at 512 MB: Flask + transformers + torch in fp32 (QUANTIZE=dynamic-int8: torch's
own dynamic int8 of every Linear layer), loaded in the worker the usual way."""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from benchmarks.apps.common import MAX_SEQ_LEN, MODEL_DIR, create_flask_app, mean_pool

tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
model = AutoModel.from_pretrained(MODEL_DIR).eval()
if os.environ.get("QUANTIZE") == "dynamic-int8":
    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def encode(texts: list[str]) -> np.ndarray:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_SEQ_LEN, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    return mean_pool(hidden.numpy(), batch["attention_mask"].numpy())


app = create_flask_app(encode)
