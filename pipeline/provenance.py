"""Where a figure comes from: package versions and the machine. The manifest records both, and every
cached result is keyed by what can change it (the runtime's versions and the CPU's instruction sets)."""

from __future__ import annotations

import os
import platform
from functools import cache
from importlib import metadata

from serve.cpu import cpu_flags_sha256, cpu_info, int8_products_saturate

VERSIONED = ("onnx", "onnxruntime", "torch", "transformers", "optimum-onnx", "tokenizers", "numpy")
RUNTIME_PACKAGES = ("onnxruntime", "numpy", "tokenizers")  # what the probe and the service run


def versions(packages: tuple[str, ...] = VERSIONED) -> dict[str, str | None]:
    """Python and each installed package's version (None when not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


@cache
def machine() -> dict[str, object]:
    """CPU count, platform, CPU model, the sha256 of its instruction-set flags (ONNX Runtime picks
    kernels by them, so speed and memory figures depend on them) and whether its int8 products saturate
    (so fidelity figures of full-range int8 depend on it too)."""
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "cpu": cpu_info().get("model name", "unknown"),
        "cpu_flags_sha256": cpu_flags_sha256(),
        "int8_products_saturate": int8_products_saturate(),
    }


def runtime_fingerprint() -> dict[str, object]:
    """What every cached evaluation or measurement depends on beyond its own inputs."""
    return {"versions": versions(RUNTIME_PACKAGES), "cpu_flags": machine()["cpu_flags_sha256"]}
