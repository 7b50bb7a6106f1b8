"""Weight-only quantization of MatMul weights to 8 or 4 bits (ONNX Runtime's MatMulNBits).

Activations stay fp32, so outputs stay close to fp32 (the fidelity that dynamic int8 can lose), at
the cost of a larger file than int8 and a slower MatMul.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from pipeline.progress import quiet_logs

if TYPE_CHECKING:
    from pipeline.candidates import PassJob


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Validated settings for MatMulNBitsQuantizer with round-to-nearest blocks."""

    bits: int
    block_size: int
    symmetric: bool = True
    # "int8": MatMulNBits quantizes each activation block to int8 at run time (accuracy_level 4) and
    # uses integer dot products: faster on CPUs with VNNI, with block-wise (not per-tensor) activation scales.
    compute: Literal["fp32", "int8"] = "fp32"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {self.bits}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be a power of two from 16 to 256, not {self.block_size}")
        if self.compute not in ("fp32", "int8"):
            raise ValueError(f"compute must be fp32 or int8, not {self.compute!r}")


WEIGHT_ONLY_PRESETS: dict[str, WeightOnlyConfig] = {
    "wo8-matmul-b32": WeightOnlyConfig(bits=8, block_size=32),
    "wo8-matmul-b32-int8-compute": WeightOnlyConfig(bits=8, block_size=32, compute="int8"),
    "wo4-matmul-b32": WeightOnlyConfig(bits=4, block_size=32),
    "wo4-matmul-b128": WeightOnlyConfig(bits=4, block_size=128),
}


@dataclass(frozen=True)
class WeightOnly:
    config: WeightOnlyConfig

    def settings(self) -> dict[str, Any]:
        return {"precision": f"int{self.config.bits}-weights", "method": "matmul-nbits", **asdict(self.config)}

    def apply(self, job: PassJob) -> None:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        algorithm = DefaultWeightOnlyQuantConfig(
            block_size=self.config.block_size,
            is_symmetric=self.config.symmetric,
            bits=self.config.bits,
            accuracy_level=4 if self.config.compute == "int8" else None,
        )
        quantizer = MatMulNBitsQuantizer(onnx.load(str(job.model_in)), algo_config=algorithm)
        with quiet_logs("", "onnxruntime.quantization.matmul_nbits_quantizer"):
            quantizer.process()
        quantizer.model.save_model_to_file(str(job.model_out), use_external_data_format=False)
