"""What the CPU's instruction sets decide: which kernels ONNX Runtime picks, so the prepacked layout,
and whether 8-bit integer products are exact.

On x86 CPUs without VNNI, ONNX Runtime multiplies uint8 activations by int8 weights with an
instruction that adds pairs of products into int16 and saturates: 2 x 255 x 127 overflows it. Weights
kept to 7 bits (`reduce_range`) cannot overflow it (2 x 255 x 64 < 32,767). With VNNI the products
accumulate in int32 and the full 8 bits are exact.
"""

from __future__ import annotations

import hashlib
import platform
from functools import cache
from pathlib import Path
from typing import Any

from serve.artifacts import ArtifactError

INT32_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@cache
def cpu_info() -> dict[str, str]:
    """The first CPU's fields as /proc/cpuinfo lists them (empty where it cannot be read)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags (x86 `flags`, Arm `Features`)."""
    info = cpu_info()
    return frozenset(info.get("flags", info.get("Features", "")).split())


def cpu_flags_sha256() -> str:
    return hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]


def int8_products_saturate(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """True where uint8 x int8 products at the full 8 bits saturate: an x86 CPU without VNNI."""
    flags = cpu_flags() if flags is None else flags
    machine = platform.machine() if machine is None else machine
    return machine.lower() in ("x86_64", "amd64", "i686", "x86") and not flags & INT32_DOT_PRODUCT_FLAGS


def full_range_int8(variant: dict[str, Any]) -> bool:
    """Whether a manifest's variant multiplies uint8 activations by int8 weights at all 8 bits."""
    return (
        variant.get("precision") in ("int8", "int8+fp32")
        and variant.get("weight_type") == "QInt8"
        and not variant.get("reduce_range", False)
    )


def check_int8_kernels(manifest: dict[str, Any], name: str) -> None:
    """Refuse a variant whose approved outputs this CPU cannot reproduce: full 8-bit int8 weights, whose
    fidelity was measured where products do not saturate, served where they do."""
    measured_saturating = bool(manifest.get("machine", {}).get("int8_products_saturate", False))
    if full_range_int8(manifest.get("variant", {})) and int8_products_saturate() and not measured_saturating:
        raise ArtifactError(
            f"{name}: its int8 weights use all 8 bits, approved on a CPU with VNNI; this CPU has no VNNI, so its "
            "int8 products saturate and its outputs are not the approved ones; re-run `make optimize` on this kind "
            "of machine"
        )
