"""Embedding tables in 8-bit blocks: the codes round-trip within half a step, and the rewritten graph
gives the same rows as the fp32 lookup under ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.candidates.weight_only import WeightOnlyConfig, quantize_blocks, quantize_embedding_tables


@pytest.mark.parametrize("symmetric", [True, False])
def test_blocks_round_trip_within_half_a_step(symmetric: bool) -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 64)).astype(np.float32)
    table[3, :32] *= 100  # one loud block must not coarsen its neighbours' scale
    table[7] = 0.0
    table[9, 32:] = rng.uniform(0.5, 2, 32)  # all positive: the asymmetric range does not waste codes
    codes, scales, zero_points = quantize_blocks(table, 32, symmetric)
    assert codes.dtype == np.uint8 and scales.shape == zero_points.shape == (50, 2)
    restored = (codes.reshape(50, 2, 32).astype(np.float32) - zero_points[..., None]) * scales[..., None]
    error = np.abs(restored.reshape(50, 64) - table).reshape(50, 2, 32).max(axis=-1)
    assert np.all(error <= scales / 2 + 1e-6)
    assert np.all(restored[7] == 0)
    assert scales[3, 0] > 50 * scales[3, 1]


def lookup_model(vocab: int, width: int, shared: bool) -> tuple[onnx.ModelProto, np.ndarray]:
    """ids → Gather(table); with `shared`, a second node also reads the table (it must stay fp32)."""
    table = np.random.default_rng(1).normal(size=(vocab, width)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup")]
    outputs = [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, None, width])]
    if shared:
        nodes.append(helper.make_node("Identity", ["table"], ["copy"]))
        outputs.append(helper.make_tensor_value_info("copy", TensorProto.FLOAT, [vocab, width]))
    graph = helper.make_graph(
        nodes,
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
        outputs,
        [numpy_helper.from_array(table, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), table


def test_rewritten_lookup_runs_in_onnxruntime_and_matches_fp32_rows() -> None:
    model, table = lookup_model(300, 64, shared=False)
    assert quantize_embedding_tables(model, 32, symmetric=True) == ["table"]
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 5, 299], [17, 17, 1]], dtype=np.int64)
    rows = session.run(None, {"ids": ids})[0]
    step = np.abs(table).max() / 127
    assert rows.shape == (2, 3, 64)
    assert np.abs(rows - table[ids]).max() <= step / 2 + 1e-6


@pytest.mark.parametrize(("width", "shared"), [(48, False), (64, True)])
def test_tables_that_cannot_be_blocked_or_are_shared_stay_fp32(width: int, shared: bool) -> None:
    model, _ = lookup_model(300, width, shared=shared)
    assert quantize_embedding_tables(model, 32, symmetric=True) == []
    assert model.graph.node[0].op_type == "Gather"


def test_embeddings_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="embeddings must be fp32 or int8, not 'int4'"):
        WeightOnlyConfig(bits=8, block_size=32, embeddings="int4")  # type: ignore[arg-type]
