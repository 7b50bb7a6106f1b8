"""How closely a variant's outputs follow fp32's: shared by evaluation and the accuracy-aware search.

Embeddings: cosine to the fp32 vector of the same text, and how many of each text's fp32 top-10
neighbours the variant still returns (a probe can hide damage that search users feel).
Classification: top-1 agreement with fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

NEIGHBOURS = 10


def cosine_to_reference(vectors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (vectors * reference).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))


def top_neighbours(vectors: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """Each row's k nearest other rows by cosine (the row itself excluded), computed in blocks."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    result = np.empty((len(unit), k), dtype=np.int64)
    for start in range(0, len(unit), 1024):
        scores = unit[start : start + 1024] @ unit.T
        rows = np.arange(scores.shape[0])
        scores[rows, start + rows] = -np.inf
        result[start : start + 1024] = np.argpartition(-scores, k, axis=1)[:, :k]
    return result


def neighbour_overlap(candidate: np.ndarray, reference_neighbours: np.ndarray) -> float:
    mine = top_neighbours(candidate, reference_neighbours.shape[1])
    shared = [len(set(a) & set(b)) for a, b in zip(mine, reference_neighbours, strict=True)]
    return float(np.mean(shared)) / reference_neighbours.shape[1]


@dataclass(frozen=True)
class Fidelity:
    """Fidelity figures of one variant against fp32 on the same texts."""

    cosine_mean: float | None = None
    cosine_min: float | None = None
    overlap_at_10: float | None = None
    agreement: float | None = None

    def evaluation_fields(self) -> dict[str, Any]:
        """The cosine, neighbours and agreement fields of an Evaluation."""
        cosine = None
        if self.cosine_mean is not None and self.cosine_min is not None:
            cosine = {"mean": self.cosine_mean, "min": self.cosine_min}
        neighbours = None if self.overlap_at_10 is None else {"overlap_at_10": self.overlap_at_10}
        return {"cosine": cosine, "neighbours": neighbours, "agreement": self.agreement}


class FidelityReference:
    """fp32 outputs for a fixed list of texts; neighbour lists computed once, reused for every variant."""

    def __init__(self, outputs: np.ndarray, embedding: bool):
        self.outputs = outputs
        self.embedding = embedding
        self.neighbours = top_neighbours(outputs) if embedding else None
        self.predictions = None if embedding else outputs.argmax(axis=1)

    def compare(self, outputs: np.ndarray) -> Fidelity:
        if self.neighbours is not None:
            cos = cosine_to_reference(outputs, self.outputs)
            return Fidelity(
                cosine_mean=round(float(cos.mean()), 6),
                cosine_min=round(float(cos.min()), 6),
                overlap_at_10=round(neighbour_overlap(outputs, self.neighbours), 4),
            )
        return Fidelity(agreement=round(float((outputs.argmax(axis=1) == self.predictions).mean()), 6))
