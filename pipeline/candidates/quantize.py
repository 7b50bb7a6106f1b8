"""Dynamic int8 quantization (weights int8 offline, activations quantized at run time), as presets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.progress import quiet_logs

if TYPE_CHECKING:
    from pipeline.candidates import PassJob


@dataclass(frozen=True)
class DynamicInt8Config:
    """Validated settings for onnxruntime.quantization.quantize_dynamic."""

    weight_type: Literal["QInt8", "QUInt8"]
    per_channel: bool
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if self.weight_type not in ("QInt8", "QUInt8"):
            raise ValueError(f"weight_type must be QInt8 or QUInt8, not {self.weight_type!r}")


DYNAMIC_INT8_PRESETS: dict[str, DynamicInt8Config] = {
    "int8-qint8-per-channel": DynamicInt8Config("QInt8", per_channel=True),
    "int8-qint8-per-tensor": DynamicInt8Config("QInt8", per_channel=False),
    "int8-quint8-per-channel": DynamicInt8Config("QUInt8", per_channel=True),
}


@dataclass(frozen=True)
class DynamicInt8:
    config: DynamicInt8Config

    def settings(self) -> dict[str, Any]:
        return {"precision": "int8", "method": "dynamic", **asdict(self.config)}

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
                reduce_range=self.config.reduce_range,
                weight_type=QuantType[self.config.weight_type],
                nodes_to_exclude=list(keep_fp32),
                # The fused graph carries contrib ops whose output types the quantizer cannot infer.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
