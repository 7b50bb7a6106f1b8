"""optimum-onnx's way: its dynamic-int8 preset (ORTQuantizer + AutoQuantizationConfig) loaded with
ORTModelForFeatureExtraction, as optimum users load it."""

from __future__ import annotations

import os

import numpy as np
from optimum.onnxruntime import ORTModelForFeatureExtraction
from transformers import AutoTokenizer

from benchmarks.apps.common import MAX_SEQ_LEN, MODEL_DIR, create_flask_app, mean_pool

tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
model = ORTModelForFeatureExtraction.from_pretrained(MODEL_DIR, file_name=os.environ["ONNX_FILE"])


def encode(texts: list[str]) -> np.ndarray:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_SEQ_LEN, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    return mean_pool(hidden.detach().numpy(), batch["attention_mask"].numpy())


app = create_flask_app(encode)
