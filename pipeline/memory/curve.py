"""Peak RSS as a function of tokens per session run, and the largest micro-batch that fits a share.

Activations, not weights, decide whether a model fits: the peak grows with batch × sequence tokens.
Measured at a few batch sizes of full-length (max_seq_len) rows, the worst case for a token count,
the peak is fitted as `base + per_token × tokens`; the largest whole number of full-length rows whose
predicted peak stays within the share becomes `max_tokens_per_run`, and is then measured for real.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MemoryCurve:
    points: tuple[tuple[int, float], ...]  # (tokens per run, measured peak MB)
    base_mb: float
    per_token_mb: float

    @classmethod
    def fit(cls, points: list[tuple[int, float]]) -> MemoryCurve:
        tokens = np.array([t for t, _ in points], dtype=float)
        peaks = np.array([p for _, p in points], dtype=float)
        if len(set(tokens)) < 2:
            raise ValueError("a memory curve needs peaks at two or more token counts")
        per_token, base = np.polyfit(tokens, peaks, 1)
        return cls(tuple(points), float(base), max(float(per_token), 0.0))

    def predict(self, tokens: int) -> float:
        return self.base_mb + self.per_token_mb * tokens

    def rows_within(self, share_mb: float, row_tokens: int, max_rows: int) -> int:
        """Most full-length rows per run (≤ max_rows) whose predicted peak stays within `share_mb`."""
        if self.per_token_mb == 0:
            return max_rows if self.base_mb <= share_mb else 0
        rows = int((share_mb - self.base_mb) / (self.per_token_mb * row_tokens))
        return max(0, min(rows, max_rows))

    def to_json(self) -> dict[str, object]:
        return {
            "points": [{"tokens": t, "peak_mb": p} for t, p in self.points],
            "base_mb": round(self.base_mb, 2),
            "per_1k_tokens_mb": round(self.per_token_mb * 1000, 3),
        }


def curve_batches(max_batch: int) -> list[int]:
    """Batch sizes to measure: 1, a quarter, a half and all of max_batch (distinct, ascending)."""
    return sorted({1, max(1, max_batch // 4), max(1, max_batch // 2), max_batch})
