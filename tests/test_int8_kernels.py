"""Int8 that is exact on the CPU it runs on: x86 CPUs without VNNI saturate uint8 x int8 products at
the full 8 bits, so int8 weights are built with 7 bits there, the node ranking rounds as the quantizer
does, and a full-range model approved on a VNNI CPU is refused where products saturate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import serve.cpu
from pipeline import cli
from pipeline.candidates import CANDIDATES
from pipeline.candidates.mixed_precision import fake_quantize
from pipeline.candidates.quantize import DYNAMIC_INT8_PRESETS, DynamicInt8, DynamicInt8Config
from serve.app import Service
from serve.artifacts import APPROVED_FILE, ArtifactError, sha256_bytes
from serve.cpu import check_int8_kernels, int8_products_saturate
from tests.conftest import TinyRun

K, N = 256, 8


def single_matmul(folder: Path, weight: np.ndarray) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    path = folder / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def run(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


@pytest.mark.parametrize(
    ("flags", "machine", "saturates"),
    [
        ({"avx2", "fma"}, "x86_64", True),
        ({"avx2", "avx512f", "avx512bw"}, "x86_64", True),
        ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", False),
        ({"avx2", "avx_vnni"}, "x86_64", False),
        ({"asimd", "asimddp"}, "aarch64", False),
    ],
)
def test_products_saturate_on_x86_without_vnni(flags: set[str], machine: str, saturates: bool) -> None:
    assert int8_products_saturate(frozenset(flags), machine) is saturates


def test_int8_weights_are_7_bit_exactly_where_products_saturate(monkeypatch: pytest.MonkeyPatch) -> None:
    for saturates in (True, False):
        monkeypatch.setattr("pipeline.candidates.quantize.int8_products_saturate", lambda s=saturates: s)
        assert DynamicInt8Config("QInt8", per_channel=True).settings()["reduce_range"] is saturates
        assert DynamicInt8Config("QInt8", per_channel=True).weight_range() == ((-64, 64) if saturates else (-127, 127))
        assert DynamicInt8Config("QUInt8", per_channel=True).settings()["reduce_range"] is False
        assert DynamicInt8Config("QInt8", per_channel=True, reduce_range=True).seven_bit_weights


def test_the_candidates_settings_name_the_weight_range_this_cpu_builds() -> None:
    """A folder built on another kind of CPU is another candidate: the settings are its cache key."""
    expected = int8_products_saturate()
    assert CANDIDATES["int8-qint8-per-channel"].settings["reduce_range"] is expected
    assert CANDIDATES["int8-mixed-qint8-per-channel"].settings["reduce_range"] is expected
    assert CANDIDATES["int8-quint8-per-channel"].settings["reduce_range"] is False


def test_the_int8_presets_multiply_exactly_on_this_cpu(tmp_path: Path) -> None:
    """Largest activations times largest weights: the pair sums a saturating CPU clips. The full-range
    build is wrong here exactly when this CPU is detected as saturating; every preset is exact."""
    fp32 = single_matmul(tmp_path, np.ones((K, N), np.float32))
    x = np.ones((1, K), np.float32)
    expected = run(fp32, x)
    full_range = DynamicInt8(DynamicInt8Config("QInt8", per_channel=True, reduce_range=False))
    full_range.quantize(fp32, tmp_path / "full.onnx")
    full_error = float(np.abs(run(tmp_path / "full.onnx", x) - expected).max() / expected.max())
    assert (full_error > 0.4) is int8_products_saturate(), full_error
    for name, config in DYNAMIC_INT8_PRESETS.items():
        DynamicInt8(config).quantize(fp32, tmp_path / f"{name}.onnx")
        np.testing.assert_allclose(run(tmp_path / f"{name}.onnx", x), expected, rtol=0.01, err_msg=name)


@pytest.mark.parametrize("reduce_range", [False, True])
@pytest.mark.parametrize("weight_type", ["QInt8", "QUInt8"])
def test_the_ranking_rounds_weights_as_the_quantizer_does(tmp_path: Path, weight_type: Any, reduce_range: bool) -> None:
    """The search ranks nodes by fake-quantized weights; they must be the weights the variant ships."""
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    weight[:, 3] *= 20
    config = DynamicInt8Config(weight_type, per_channel=True, reduce_range=reduce_range)
    DynamicInt8(config).quantize(single_matmul(tmp_path, weight), tmp_path / "q.onnx")
    values = {w.name: numpy_helper.to_array(w) for w in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    quantized = values["w_quantized"].astype(np.float32)
    low, high = config.weight_range()
    assert quantized.min() >= low and quantized.max() <= high and high in np.abs(quantized)
    shipped = (quantized - values["w_zero_point"].astype(np.float32)) * values["w_scale"]
    np.testing.assert_allclose(fake_quantize(weight, config.weight_range(), axis=0), shipped, rtol=1e-5, atol=1e-6)


def test_fake_quantize_rounds_within_half_a_step_and_keeps_zero() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 16)).astype(np.float32)
    weight[:, 3] *= 100  # one loud column must not coarsen the others' scale (per channel)
    for levels in ((-127, 127), (-64, 64)):
        per_channel = fake_quantize(weight, levels, axis=0)
        steps = np.abs(weight).max(axis=0) / levels[1]
        assert np.all(np.abs(per_channel - weight) <= steps / 2 + 1e-6)
        assert np.all(fake_quantize(np.zeros((4, 4), np.float32), levels, axis=0) == 0)
    activation = np.concatenate([rng.uniform(0.5, 3, 100), [0.0]]).astype(np.float32)
    unsigned = fake_quantize(activation, (0, 255), axis=None)
    assert unsigned[-1] == 0.0  # zero (padding, ReLU output) is exactly representable
    assert np.abs(unsigned - activation).max() <= 3 / 255 / 2 + 1e-6


def manifest(precision: str, weight_type: str, reduce_range: bool, built_saturating: bool | None) -> dict[str, Any]:
    machine = {} if built_saturating is None else {"int8_products_saturate": built_saturating}
    variant = {"name": "v", "precision": precision, "weight_type": weight_type, "reduce_range": reduce_range}
    return {"variant": variant, "machine": machine}


@pytest.mark.parametrize(
    ("approved", "refused"),
    [
        (manifest("int8", "QInt8", False, built_saturating=False), True),
        (manifest("int8+fp32", "QInt8", False, built_saturating=None), True),
        (manifest("int8+fp32", "QInt8", False, built_saturating=True), False),  # its gates saw these kernels
        (manifest("int8", "QInt8", True, built_saturating=False), False),
        (manifest("int8", "QUInt8", False, built_saturating=False), False),
        ({"variant": {"precision": "int8-weights", "bits": 8}, "machine": {}}, False),
    ],
)
def test_a_service_where_products_saturate_refuses_int8_approved_where_they_did_not(
    monkeypatch: pytest.MonkeyPatch, approved: dict[str, Any], refused: bool
) -> None:
    monkeypatch.setattr(serve.cpu, "int8_products_saturate", lambda: True)
    if refused:
        with pytest.raises(ArtifactError, match="int8 products saturate"):
            check_int8_kernels(approved, "minilm")
    else:
        check_int8_kernels(approved, "minilm")
    monkeypatch.setattr(serve.cpu, "int8_products_saturate", lambda: False)
    check_int8_kernels(approved, "minilm")


def approve_as_int8_from_a_vnni_cpu(model_dir: Path, reduce_range: bool = False) -> None:
    """Rewrite an approval's manifest (and re-sign its pointer) as an int8 variant, full-range or with
    7-bit weights (`reduce_range`), measured on a CPU whose products do not saturate."""
    pointer = json.loads((model_dir / APPROVED_FILE).read_text())
    path = model_dir / pointer["manifest"]
    approved = json.loads(path.read_text())
    approved["variant"].update(precision="int8", weight_type="QInt8", reduce_range=reduce_range)
    approved["machine"]["int8_products_saturate"] = False
    path.write_text(json.dumps(approved))
    pointer["sha256"] = sha256_bytes(path.read_bytes())
    (model_dir / APPROVED_FILE).write_text(json.dumps(pointer))


def test_the_service_and_verify_refuse_it_and_serve_the_other_models(
    tiny_run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny_run.artifacts, artifacts)
    approve_as_int8_from_a_vnni_cpu(artifacts / "tiny-embed")
    approve_as_int8_from_a_vnni_cpu(artifacts / "tiny-clf", reduce_range=True)  # 7 bits never saturate
    monkeypatch.setenv("ARTIFACTS_DIR", str(artifacts))
    monkeypatch.setattr(serve.cpu, "int8_products_saturate", lambda: True)
    service = Service.from_config(tiny_run.service)
    assert "int8 products saturate" in service.failures["tiny-embed"] and set(service.models) == {"tiny-clf"}
    with pytest.raises(SystemExit) as exited:
        cli.main(["verify", "--service", str(tiny_run.service)])
    out = capsys.readouterr().out
    assert exited.value.code == 1 and "verify tiny-embed: FAILED" in out and "verify tiny-clf: ok" in out
    monkeypatch.setattr(serve.cpu, "int8_products_saturate", lambda: False)
    assert set(Service.from_config(tiny_run.service).models) == {"tiny-embed", "tiny-clf"}


def test_the_report_says_how_each_candidate_was_built_and_on_what_cpu(tiny_run: TinyRun) -> None:
    report = json.loads((tiny_run.artifacts / "report.json").read_text())
    assert report["machine"]["int8_products_saturate"] is int8_products_saturate()
    for row in report["models"][0]["candidates"]:
        spec = CANDIDATES[row["variant"]]
        assert {k: v for k, v in row["settings"].items() if k != "calibration"} == spec.settings
    markdown = (tiny_run.artifacts / "report.md").read_text()
    built = next(line for line in markdown.splitlines() if line.startswith("- int8-qint8-per-channel: "))
    assert f"reduce_range {json.dumps(int8_products_saturate())}" in built, built
    assert ("saturate at 8 bits" in markdown) is int8_products_saturate()
