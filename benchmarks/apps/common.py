"""What every benchmark contender app shares: the same HTTP surface as memfit's service (/api/ready,
/api/embed with {"inputs": [...]} -> {"embeddings": [...]}) and sentence-transformers mean pooling, so
one request mix drives them all. Settings come from env vars set by benchmarks.run."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from flask import Flask, Response, jsonify, request

MODEL_DIR = os.environ.get("MODEL_DIR", "")
MAX_SEQ_LEN = int(os.environ.get("MAX_SEQ_LEN", "128"))


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the token vectors under the attention mask, unit-normalized (sentence-transformers)."""
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def create_flask_app(encode: Callable[[list[str]], np.ndarray]) -> Flask:
    app = Flask(__name__)

    @app.get("/api/ready")
    def ready() -> Response:
        return jsonify({"ready": True})

    @app.post("/api/embed")
    def embed() -> Response:
        texts = request.get_json()["inputs"]
        return jsonify({"embeddings": np.asarray(encode(texts), dtype=np.float32).tolist()})

    return app
