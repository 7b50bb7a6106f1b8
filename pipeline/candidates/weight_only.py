"""Weight-only quantization of MatMul weights to 8 or 4 bits (ONNX Runtime's MatMulNBits), and
optionally of embedding tables to 8-bit blocks (GatherBlockQuantized).

Activations stay fp32, so outputs stay close to fp32 (the fidelity that dynamic int8 can lose), at
the cost of a larger file than int8 and a slower MatMul. The MatMul quantizer leaves Gather tables in
fp32, yet the word-embedding table is the largest single weight of a small encoder (94 MB of
all-mpnet-base-v2's 436): an 8-bit table with one scale per block holds it in a quarter of that, and a
lookup only dequantizes the rows a request uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.progress import quiet_logs

if TYPE_CHECKING:
    import onnx

    from pipeline.candidates import PassJob

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Validated settings for MatMulNBitsQuantizer with round-to-nearest blocks."""

    bits: int
    block_size: int
    symmetric: bool = True
    # "int8": MatMulNBits quantizes each activation block to int8 at run time (accuracy_level 4) and
    # uses integer dot products: faster on CPUs with VNNI, with block-wise (not per-tensor) activation scales.
    compute: Literal["fp32", "int8"] = "fp32"
    # "int8": constant embedding tables (Gather) too, in 8-bit blocks of block_size along each row.
    embeddings: Literal["fp32", "int8"] = "fp32"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {self.bits}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be a power of two from 16 to 256, not {self.block_size}")
        if self.compute not in ("fp32", "int8"):
            raise ValueError(f"compute must be fp32 or int8, not {self.compute!r}")
        if self.embeddings not in ("fp32", "int8"):
            raise ValueError(f"embeddings must be fp32 or int8, not {self.embeddings!r}")


WEIGHT_ONLY_PRESETS: dict[str, WeightOnlyConfig] = {
    "wo8-matmul-b32": WeightOnlyConfig(bits=8, block_size=32),
    "wo8-matmul-b32-int8-compute": WeightOnlyConfig(bits=8, block_size=32, compute="int8"),
    "wo8-matmul-gather-b32": WeightOnlyConfig(bits=8, block_size=32, embeddings="int8"),
    "wo8-matmul-gather-b32-int8-compute": WeightOnlyConfig(bits=8, block_size=32, compute="int8", embeddings="int8"),
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
        if self.config.embeddings == "int8":
            quantize_embedding_tables(quantizer.model.model, self.config.block_size, self.config.symmetric)
        quantizer.model.save_model_to_file(str(job.model_out), use_external_data_format=False)


def quantize_blocks(table: np.ndarray, block_size: int, symmetric: bool) -> tuple[np.ndarray, ...]:
    """uint8 codes, fp32 scales and uint8 zero points for each block of `block_size` along each row:
    `value ≈ (code − zero_point) × scale`."""
    rows, cols = table.shape
    blocks = table.reshape(rows, cols // block_size, block_size)
    if symmetric:
        scales = np.abs(blocks).max(axis=-1) / 127
        zero_points = np.full(scales.shape, 128.0)
    else:
        low, high = np.minimum(blocks.min(axis=-1), 0), np.maximum(blocks.max(axis=-1), 0)
        scales = (high - low) / 255
        zero_points = np.round(-low / np.where(scales == 0, 1, scales))
    scales = np.where(scales == 0, 1, scales).astype(np.float32)
    codes = np.clip(np.round(blocks / scales[..., None]) + zero_points[..., None], 0, 255)
    return codes.astype(np.uint8).reshape(rows, cols), scales, zero_points.astype(np.uint8)


def quantize_embedding_tables(model: onnx.ModelProto, block_size: int, symmetric: bool) -> list[str]:
    """Replace each row lookup (Gather on axis 0) of a 2-D fp32 initializer that nothing else reads, and
    whose rows split into whole blocks, by GatherBlockQuantized on 8-bit blocks. Returns the tables."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    tables = {init.name: init for init in graph.initializer if init.name not in {i.name for i in graph.input}}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    nodes, quantized = [], []
    for node in graph.node:
        table = tables.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if (
            table is None
            or axis != 0
            or readers[table.name] != 1
            or table.data_type != onnx.TensorProto.FLOAT
            or len(table.dims) != 2
            or table.dims[1] % block_size
        ):
            nodes.append(node)
            continue
        arrays = quantize_blocks(numpy_helper.to_array(table), block_size, symmetric)
        names = [f"{table.name}_q8", f"{table.name}_scales", f"{table.name}_zero_points"]
        graph.initializer.remove(table)
        graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip(arrays, names, strict=True))
        nodes.append(
            helper.make_node(
                "GatherBlockQuantized",
                [names[0], node.input[1], names[1], names[2]],
                list(node.output),
                name=f"{node.name}_q8",
                domain=MS_DOMAIN,
                gather_axis=0,
                quantize_axis=1,
                block_size=block_size,
                bits=8,
            )
        )
        quantized.append(table.name)
    del graph.node[:]
    graph.node.extend(nodes)
    if quantized and all(o.domain != MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return quantized
