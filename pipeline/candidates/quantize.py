"""Dynamic int8 quantization (weights int8 offline, activations quantized at run time), as presets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.progress import quiet_logs
from serve.cpu import int8_products_saturate

if TYPE_CHECKING:
    from pipeline.candidates import PassJob


@dataclass(frozen=True)
class DynamicInt8Config:
    """Validated settings for onnxruntime.quantization.quantize_dynamic.

    `reduce_range` None: 7-bit weights exactly where this CPU's uint8 x int8 products saturate
    (serve/cpu.py), since a model is built on the kind of machine it serves on; uint8 weights never
    saturate and keep all 8 bits.
    """

    weight_type: Literal["QInt8", "QUInt8"]
    per_channel: bool
    reduce_range: bool | None = None

    def __post_init__(self) -> None:
        if self.weight_type not in ("QInt8", "QUInt8"):
            raise ValueError(f"weight_type must be QInt8 or QUInt8, not {self.weight_type!r}")

    @property
    def seven_bit_weights(self) -> bool:
        if self.reduce_range is not None:
            return self.reduce_range
        return self.weight_type == "QInt8" and int8_products_saturate()

    def weight_range(self) -> tuple[int, int]:
        """The integers a weight is rounded to, as quantize_dynamic picks them (symmetric for int8)."""
        if self.weight_type == "QInt8":
            return (-64, 64) if self.seven_bit_weights else (-127, 127)
        return (0, 127) if self.seven_bit_weights else (0, 255)

    def settings(self) -> dict[str, Any]:
        """What the built model depends on: the resolved range, so a build on another CPU is another candidate."""
        return {**asdict(self), "reduce_range": self.seven_bit_weights}


DYNAMIC_INT8_PRESETS: dict[str, DynamicInt8Config] = {
    "int8-qint8-per-channel": DynamicInt8Config("QInt8", per_channel=True),
    "int8-qint8-per-tensor": DynamicInt8Config("QInt8", per_channel=False),
    "int8-quint8-per-channel": DynamicInt8Config("QUInt8", per_channel=True),
}


@dataclass(frozen=True)
class DynamicInt8:
    config: DynamicInt8Config

    def settings(self) -> dict[str, Any]:
        return {"precision": "int8", "method": "dynamic", **self.config.settings()}

    def apply(self, job: PassJob) -> None:
        self.quantize(job.model_in, job.model_out)

    def quantize(self, model_in: Path, model_out: Path, keep_fp32: Sequence[str] = ()) -> None:
        """Quantize every supported node except those named in `keep_fp32`."""
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # The quantizer logs an advisory on the root logger for every call; keep the build output readable.
        with quiet_logs(""):
            quantize_dynamic(
                model_in,
                model_out,
                per_channel=self.config.per_channel,
                reduce_range=self.config.seven_bit_weights,
                weight_type=QuantType[self.config.weight_type],
                nodes_to_exclude=list(keep_fp32),
                # The fused graph carries contrib ops whose output types the quantizer cannot infer.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
