"""Per-candidate results on disk, keyed by everything that decides them, so a rerun skips the work.

A key is the hash of a JSON description: the candidate's model bytes (sha256), the source weights,
the settings, data and limits the result depends on, a version per result kind (bumped when the way
it is computed changes), and the runtime's versions and the CPU's flags. A changed input is a different
key, never a stale hit.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import json_bytes, write_bytes_atomic
from pipeline.provenance import runtime_fingerprint
from serve.artifacts import read_json


def cache_key(**parts: Any) -> str:
    """The key of a result that depends on `parts`, and on the runtime versions and CPU flags."""
    text = json.dumps({**parts, "runtime": runtime_fingerprint()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class ResultCache:
    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, kind: str, key: str, suffix: str) -> Path:
        return self.folder / f"{kind}-{key}{suffix}"

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        path = self.path(kind, key, ".json")
        return read_json(path) if path.is_file() else None

    def put(self, kind: str, key: str, value: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.path(kind, key, ".json"), json_bytes(value))

    def get_arrays(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(kind, key, ".npz")
        if not path.is_file():
            return None
        with np.load(path) as data:
            return {name: data[name] for name in data.files}

    def put_arrays(self, kind: str, key: str, arrays: dict[str, np.ndarray]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **arrays)
        write_bytes_atomic(self.path(kind, key, ".npz"), buffer.getvalue())
