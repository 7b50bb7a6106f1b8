"""A candidate's outputs for many texts, as evaluation and the mixed-precision search need them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.progress import bar
from serve.runtime import ModelRuntime

CHUNK = 256  # texts per progress step


def outputs(runtime: ModelRuntime, texts: Sequence[str], label: str) -> np.ndarray:
    """Every text's output (truncated to max_seq_len as the service would), in the texts' order. The
    texts are tokenized first and run shortest first, so that each micro-batch pads to texts of like
    length across the whole set, not only within one progress step: fp32 MiniLM on its 6,752 test
    texts took 41.3 and 36.8 s against 46.7 and 45.1 s (runs alternated after a warm-up)."""
    rows = runtime.token_ids(texts)
    order = sorted(range(len(rows)), key=lambda index: len(rows[index]))
    steps = [order[start : start + CHUNK] for start in range(0, len(order), CHUNK)]
    ordered = np.concatenate([runtime.run([rows[index] for index in step]) for step in bar(steps, label)])
    result = np.empty_like(ordered)
    result[order] = ordered
    return result
