"""The contenders of `make bench`: how each is prepared from the same source model and how it is served.

Every one runs as one gunicorn worker on 127.0.0.1 behind the same HTTP surface. The ONNX artifacts
of optimum-onnx and sentence-transformers are built once per model into the benchmark's work folder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.atomic import atomic_dir
from pipeline.memory.probe import PROJECT_ROOT

APPS_CONFIG = PROJECT_ROOT / "benchmarks" / "apps" / "gunicorn.conf.py"
MEMFIT_CONFIG = PROJECT_ROOT / "serve" / "gunicorn.conf.py"


@dataclass(frozen=True)
class Contender:
    name: str
    label: str  # what it is, for the table
    app: str  # gunicorn app spec
    config_file: Path
    env: dict[str, str] = field(default_factory=dict)


def int8_preset() -> str:
    """The dynamic-int8 preset the CPU supports (optimum and sentence-transformers name them alike)."""
    flags = Path("/proc/cpuinfo").read_text()
    return "avx512_vnni" if "avx512_vnni" in flags else "avx2"


def optimum_artifact(source: Path, work: Path) -> tuple[Path, str]:
    """Export with optimum-onnx, then quantize with its AutoQuantizationConfig dynamic preset."""
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig
    from transformers import AutoTokenizer

    target = work / "optimum"
    file_name = "model_quantized.onnx"
    if not (target / file_name).is_file():
        with atomic_dir(target) as tmp:
            ORTModelForFeatureExtraction.from_pretrained(source, export=True).save_pretrained(tmp)
            AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
            config = getattr(AutoQuantizationConfig, int8_preset())(is_static=False, per_channel=False)
            ORTQuantizer.from_pretrained(tmp).quantize(quantization_config=config, save_dir=tmp)
    return target, file_name


def sentence_transformers_artifact(source: Path, work: Path) -> tuple[Path, str]:
    """The model folder plus onnx/model_qint8_<preset>.onnx from export_dynamic_quantized_onnx_model."""
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    target = work / "sentence-transformers"
    preset = int8_preset()
    file_name = f"onnx/model_qint8_{preset}.onnx"
    if not (target / file_name).is_file():
        with atomic_dir(target) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            model = SentenceTransformer(str(tmp), backend="onnx", device="cpu")
            export_dynamic_quantized_onnx_model(model, preset, str(tmp))
    return target, file_name


def contenders(source: Path, work: Path, memfit_service: Path, max_seq_len: int) -> list[Contender]:
    """Every contender for one model; memfit last, so ratios read 'contender / memfit'."""
    base = {"MAX_SEQ_LEN": str(max_seq_len)}
    optimum_dir, optimum_file = optimum_artifact(source, work)
    st_dir, st_file = sentence_transformers_artifact(source, work)
    torch_app = "benchmarks.apps.torch_app:app"
    return [
        Contender(
            "torch-fp32",
            "Flask + transformers + torch fp32",
            torch_app,
            APPS_CONFIG,
            {**base, "MODEL_DIR": str(source)},
        ),
        Contender(
            "torch-int8",
            "same, torch.ao quantize_dynamic int8",
            torch_app,
            APPS_CONFIG,
            {**base, "MODEL_DIR": str(source), "QUANTIZE": "dynamic-int8"},
        ),
        Contender(
            "optimum-int8",
            f"optimum-onnx ORTQuantizer {int8_preset()} dynamic",
            "benchmarks.apps.optimum_app:app",
            APPS_CONFIG,
            {**base, "MODEL_DIR": str(optimum_dir), "ONNX_FILE": optimum_file},
        ),
        Contender(
            "st-onnx-int8",
            f"sentence-transformers export_dynamic_quantized_onnx_model {int8_preset()}",
            "benchmarks.apps.st_app:app",
            APPS_CONFIG,
            {**base, "MODEL_DIR": str(st_dir), "ONNX_FILE": st_file},
        ),
        Contender(
            "memfit",
            "memfit approved artifact, memfit service",
            "serve.app:create_app()",
            MEMFIT_CONFIG,
            {"SERVICE_CONFIG": str(memfit_service)},
        ),
    ]
