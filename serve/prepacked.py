"""Weights every worker shares: ONNX Runtime's prepacked constant initializers, saved beside the model
and memory-mapped on load.

Loaded from `model.onnx`, every worker copies and repacks the weights into its own private memory.
Loaded from `model.prepacked.onnx`, the packed weights stay in the file `model.prepacked.bin`, mapped
read-only: one copy in the page cache for all workers, counted once by the kernel, and reclaimable under
pressure instead of a reason to kill a process. The packed layout depends on the ONNX Runtime version and
the CPU's instruction sets, so `prepacked.json` records both; where they differ the service loads the
portable `model.onnx` and says why (`SHARED_WEIGHTS=require` refuses instead). The build writes them
(pipeline/prepack.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from serve.artifacts import ArtifactError
from serve.config import SharedWeights
from serve.cpu import cpu_flags_sha256

PREPACKED_MODEL = "model.prepacked.onnx"
PREPACKED_DATA = "model.prepacked.bin"
PREPACKED_STAMP = "prepacked.json"
PREPACKED_FILES = (PREPACKED_MODEL, PREPACKED_DATA, PREPACKED_STAMP)


def platform_stamp() -> dict[str, str]:
    """What a packed layout is valid for."""
    return {"onnxruntime": ort.__version__, "cpu_flags_sha256": cpu_flags_sha256()}


def stale_reason(folder: Path) -> str | None:
    """Why `folder`'s prepacked weights cannot be loaded here (None when they can)."""
    try:
        stamp = json.loads((folder / PREPACKED_STAMP).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "the artifact has no prepacked weights"
    except (OSError, ValueError) as exc:
        return f"{PREPACKED_STAMP} is unreadable ({exc})"
    here = platform_stamp()
    if stamp.get("onnxruntime") != here["onnxruntime"]:
        return f"prepacked by onnxruntime {stamp.get('onnxruntime')}, this is {here['onnxruntime']}"
    if stamp.get("cpu_flags_sha256") != here["cpu_flags_sha256"]:
        return "prepacked on a CPU with other instruction sets"
    if not all((folder / name).is_file() for name in PREPACKED_FILES):
        return "a prepacked file is missing"
    return None


@dataclass(frozen=True)
class WeightsChoice:
    """Which model file a session loads, and why: `shared` when the prepacked weights are mapped."""

    path: Path
    shared: bool
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"file": self.path.name, "shared": self.shared, "reason": self.reason}


def choose_weights(portable: Path, policy: SharedWeights, prepacking: bool = True) -> WeightsChoice:
    """The prepacked model beside `portable` where it is valid here, else `portable`; ArtifactError
    under `require`."""
    folder = portable.parent
    if policy == "private":
        return WeightsChoice(portable, False, "private weights: SHARED_WEIGHTS=private")
    reason = stale_reason(folder) if prepacking else "the session disables prepacking"
    if reason is None:
        return WeightsChoice(folder / PREPACKED_MODEL, True, "prepacked weights memory-mapped, shared by workers")
    if policy == "require":
        raise ArtifactError(f"{folder.name}: SHARED_WEIGHTS=require, but {reason}")
    return WeightsChoice(portable, False, f"private weights: {reason}")


def prepacked_files(folder: Path) -> tuple[str, ...]:
    """The prepacked files an artifact ships: all three when valid here, else none."""
    return PREPACKED_FILES if stale_reason(folder) is None else ()
