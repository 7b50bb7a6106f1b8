"""sentence-transformers' way: the artifact of export_dynamic_quantized_onnx_model, loaded with
backend="onnx"."""

from __future__ import annotations

import os

import numpy as np
from sentence_transformers import SentenceTransformer

from benchmarks.apps.common import MAX_SEQ_LEN, MODEL_DIR, create_flask_app

model = SentenceTransformer(
    MODEL_DIR, backend="onnx", device="cpu", model_kwargs={"file_name": os.environ["ONNX_FILE"]}
)
model.max_seq_length = MAX_SEQ_LEN


def encode(texts: list[str]) -> np.ndarray:
    return np.asarray(model.encode(texts, batch_size=32, normalize_embeddings=True))


app = create_flask_app(encode)
