"""The ONNX projected reference shares the graph and its exported structure
(OnnxFrontend.with_weights): same numbers as a full copy, the original untouched, and
edits or saves of the reference work on a graph of its own."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune as gp
from graphprune.frontends.onnx import load_onnx

pytestmark = pytest.mark.notorch


def _model(path: str) -> str:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 16, 3, 3)).astype(np.float32), "w2")
    small = numpy_helper.from_array(np.float32(0.5).reshape(()), "half")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Mul", ["c2", "half"], ["y"], name="scale"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [w1, b1, w2, small])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_reference_shares_the_structure_and_matches_a_full_copy(tmp_path) -> None:
    graph = load_onnx(_model(str(tmp_path / "m.onnx")))
    before = {k: graph.param(k).copy() for k in ("w1", "b1", "w2")}
    new_w2 = before["w2"].copy()
    new_w2[:, :4] = 0.0
    ref = graph.with_weights({"w2": new_w2})
    assert ref.frontend.graph is graph.frontend.graph  # shared, not copied
    full = graph.copy()
    full.set_param("w2", new_w2)
    x = graph.random_inputs(0)
    assert np.array_equal(ref.run(*x)[0], full.run(*x)[0])
    assert not np.array_equal(ref.run(*x)[0], graph.run(*x)[0])
    assert np.array_equal(ref.param("w2"), new_w2)
    for key, value in before.items():  # the original's weights are untouched
        assert np.array_equal(graph.param(key), value), key


def test_edits_and_saves_of_the_reference_use_its_own_graph(tmp_path) -> None:
    graph = load_onnx(_model(str(tmp_path / "m.onnx")))
    x = graph.random_inputs(0)
    out = graph.run(*x)[0]
    w2 = graph.param("w2") * 2
    ref = graph.with_weights({"w2": w2})
    ref.set_param("b1", graph.param("b1") + 1)  # an edit: the graph becomes its own
    assert ref.frontend.graph is not graph.frontend.graph
    assert np.array_equal(ref.param("w2"), w2) and np.array_equal(graph.param("w2") * 2, w2)
    assert np.array_equal(graph.run(*x)[0], out)
    ref2 = graph.with_weights({"w2": w2})
    ref2.to_onnx(str(tmp_path / "ref.onnx"))
    saved = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "ref.onnx")).graph.initializer}
    assert np.array_equal(saved["w2"], w2)
    assert np.array_equal(graph.run(*x)[0], out)
    pruned = gp.run(graph.with_weights({"w2": w2}), "prune-channels{ratio=0.5}")  # a pass on a shared reference
    assert pruned.results[0].modified and np.array_equal(graph.run(*x)[0], out)


def test_a_small_embedded_constant_is_replaced_in_the_structure(tmp_path) -> None:
    graph = load_onnx(_model(str(tmp_path / "m.onnx")))
    assert "half" not in graph.frontend.session_model().weights  # embedded, not handed over
    ref = graph.with_weights({"half": np.float32(2.0).reshape(()), "w2": graph.param("w2") * 3})
    assert ref.frontend.graph is graph.frontend.graph
    x = graph.random_inputs(0)
    got, base = ref.run(*x)[0], graph.run(*x)[0]
    assert np.abs(got - base * 12).max() <= 1e-5 * np.abs(base * 12).max()  # half -> 2 (x4), w2 x3
    full = graph.copy()
    full.set_param("half", np.float32(2.0).reshape(()))
    full.set_param("w2", graph.param("w2") * 3)
    assert np.array_equal(got, full.run(*x)[0])
    assert np.array_equal(graph.run(*x)[0], base)  # the original's structure kept 0.5
