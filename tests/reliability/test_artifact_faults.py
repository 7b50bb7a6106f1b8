"""Damaged or unsafe artifacts: nothing is loaded from them, the service stays up and says why."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.memory.harness import GunicornService
from serve.artifacts import ArtifactError, load_approved
from serve.onnx_refs import check_external_data, external_data_locations
from tests.conftest import TinyRun
from tests.helpers import memfit

pytestmark = pytest.mark.reliability


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_model_keeps_service_up_but_not_ready(tiny_copy: TinyRun) -> None:
    flip_byte(load_approved(tiny_copy.artifacts / "tiny-embed", verify=False).folder / "model.onnx")
    service = GunicornService(tiny_copy.service)
    try:
        service.start(wait_ready=False)
        service.wait_until(503)
        ready = service.request("GET", "/api/ready")
        assert ready.status == 503
        assert "tiny-embed" in ready.body["error"]["message"] and "model.onnx" in ready.body["error"]["message"]
        health = service.request("GET", "/api/health")
        assert health.status == 200 and health.body["models"]["tiny-embed"] is None  # no session created
        assert service.request("POST", "/api/embed", {"inputs": ["x"], "model": "tiny-embed"}).status == 503
        assert service.request("POST", "/api/classify", {"inputs": ["x"]}).status == 200  # the sound model serves
    finally:
        service.stop()
    done = memfit("verify", "--service", str(tiny_copy.service))
    assert done.returncode == 1 and "model.onnx: sha256 differs" in done.stdout


def model_with_external_data(folder: Path, location: str) -> Path:
    """A one-initializer ONNX model whose weights live in an external file at `location`."""
    weights = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weights],
    )
    model = helper.make_model(graph)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    saved = onnx.load(path, load_external_data=False)
    for entry in saved.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save_model(saved, path)
    return path


def test_safe_external_data_is_found_and_accepted(tmp_path: Path) -> None:
    path = model_with_external_data(tmp_path / "a", "weights.bin")
    assert external_data_locations(path) == ["weights.bin"]
    assert check_external_data(path) == ["weights.bin"]
    with pytest.raises(ArtifactError, match="not listed in the manifest"):
        check_external_data(path, allowed={"model.onnx"})


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin", "sub/../../outside.bin"])
def test_escaping_external_data_is_refused(tmp_path: Path, location: str) -> None:
    path = model_with_external_data(tmp_path / "a", location)
    with pytest.raises(ArtifactError, match="absolute or leaves the artifact folder"):
        check_external_data(path)


def test_symlinked_external_data_is_refused(tmp_path: Path) -> None:
    path = model_with_external_data(tmp_path / "a", "weights.bin")
    outside = tmp_path / "secret.bin"
    os.replace(path.parent / "weights.bin", outside)
    (path.parent / "weights.bin").symlink_to(outside)
    with pytest.raises(ArtifactError, match="symlinks are not allowed"):
        check_external_data(path)


def test_service_refuses_an_approved_model_with_escaping_external_data(tiny_copy: TinyRun) -> None:
    """Even a manifest that verifies cannot smuggle in a model that reads outside its folder."""
    import json

    from pipeline.atomic import json_bytes
    from serve.artifacts import sha256_bytes, sha256_file

    model_dir = tiny_copy.artifacts / "tiny-embed"
    artifact = load_approved(model_dir)
    evil = model_with_external_data(artifact.folder / "evil", "../../../../etc/passwd")
    os.replace(evil, artifact.folder / "model.onnx")
    manifest = artifact.manifest
    manifest["files"]["model.onnx"] = {
        "sha256": sha256_file(artifact.folder / "model.onnx"),
        "bytes": (artifact.folder / "model.onnx").stat().st_size,
    }
    (artifact.folder / "manifest.json").write_bytes(json_bytes(manifest))
    pointer = json.loads((model_dir / "approved.json").read_text())
    pointer["sha256"] = sha256_bytes((artifact.folder / "manifest.json").read_bytes())
    (model_dir / "approved.json").write_text(json.dumps(pointer))
    load_approved(model_dir)  # the checksums alone would pass

    from serve.app import Service

    service = Service.from_config(tiny_copy.service)
    assert "tiny-embed" not in service.models
    assert "external data '../../../../etc/passwd' refused" in service.failures["tiny-embed"]
