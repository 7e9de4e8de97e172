"""Recurrent and control-flow ONNX graphs: LSTM/GRU/RNN and If/Loop stay frozen (reason
named), the convs and linears around them prune, and a value a subgraph reads from the
enclosing graph keeps its channels; the output runs in onnxruntime and matches."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import graphprune as gp
from graphprune.samples.models import randomize_
from helpers import assert_rel_close


class ConvRecurrent(nn.Module):
    """conv -> conv -> (N, T, C) -> LSTM/GRU/RNN -> linear -> relu -> linear."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 3, padding=1)
        self.c2 = nn.Conv1d(16, 12, 3, padding=1)
        self.rnn = getattr(nn, cell)(12, 10, batch_first=True)
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        y, _ = self.rnn(y.transpose(1, 2))
        return self.fc2(torch.relu(self.fc1(y)))


def ort_run(path: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def weight_rows(graph: gp.Graph, name: str) -> int:
    """Output channels of conv or linear ``name`` (from its output's shape)."""
    node = graph.node(name)
    shape = graph.shape(node.outputs[0])
    return int(shape[-1] if node.kind == "linear" else shape[1])


@pytest.mark.parametrize("cell,op", [("LSTM", "LSTM"), ("GRU", "GRU"), ("RNN", "RNN")])
def test_recurrent_op_frozen_and_layers_around_it_prune(cell: str, op: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = randomize_(ConvRecurrent(cell)).eval()
    path = str(tmp_path / f"{cell}.onnx")
    x = torch.randn(1, 4, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"])
    graph = gp.load_onnx(path)
    rnn = next(n for n in graph.nodes if n.target.startswith(op))
    assert rnn.kind == "unknown" and "recurrent op" in rnn.target
    result = gp.run(graph, "prune-channels{ratio=0.5}")
    r = result.results[0]
    pruned = r.graph
    convs = [n.name for n in graph.nodes if n.kind == "conv"]
    linears = [n.name for n in graph.nodes if n.kind == "linear"]
    assert weight_rows(pruned, convs[0]) == 8, "the conv before the conv feeding the LSTM prunes"
    assert weight_rows(pruned, convs[1]) == 12, "the conv feeding the recurrent op keeps its channels"
    assert weight_rows(pruned, linears[0]) == 8, "the hidden layer after the recurrent op prunes"
    out = str(tmp_path / f"{cell}-slim.onnx")
    pruned.to_onnx(out)
    onnx.checker.check_model(onnx.load(out))
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 4, 20)).astype(np.float32)}
    reference = r.reference().run(torch.from_numpy(feeds["x"]))
    assert_rel_close(ort_run(out, feeds), reference)


# --------------------------------------------------------------- If and Loop
RNG = np.random.default_rng(0)


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return nh.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _conv(x: str, w: str, y: str, name: str = "") -> onnx.NodeProto:
    return h.make_node("Conv", [x, w], [y], pads=[1, 1, 1, 1], name=name or y)


def _vi(name: str, shape: list[int], dtype: int = T.FLOAT) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, dtype, shape)


def if_model() -> onnx.ModelProto:
    """conv1 -> relu -> a; conv2(a, w2) -> b; If(cond): then = Conv(x2, w2) reads the
    outer initializer w2 (which conv2 also uses) and adds the outer value ``a``;
    else = Relu(b).  Then conv3 -> relu -> conv4 (prunable around the If)."""
    then_g = h.make_graph([_conv("x2", "w2", "t0"), h.make_node("Add", ["t0", "a"], ["t"])], "then", [],
                         [_vi("t", [1, 8, 8, 8])])
    else_g = h.make_graph([h.make_node("Relu", ["b"], ["e"])], "else", [], [_vi("e", [1, 8, 8, 8])])
    nodes = [
        _conv("x", "w0", "c0", "conv0"), h.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        _conv("r0", "w1", "c1", "conv1"), h.make_node("Relu", ["c1"], ["a"], name="relu1"),
        _conv("a", "w2", "b", "conv2"),
        h.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="branch"),
        _conv("y", "w3", "z", "conv3"), h.make_node("Relu", ["z"], ["zr"], name="relu3"),
        h.make_node("Conv", ["zr", "w4"], ["out"], name="conv4"),
    ]
    inits = [_init("w0", 6, 3, 3, 3), _init("w1", 8, 6, 3, 3), _init("w2", 8, 8, 3, 3), _init("w3", 8, 8, 3, 3),
             _init("w4", 4, 8, 1, 1)]
    g = h.make_graph(nodes, "ifm", [_vi("x", [1, 3, 8, 8]), _vi("cond", [], T.BOOL), _vi("x2", [1, 8, 8, 8])],
                     [_vi("out", [1, 4, 8, 8])], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_if_reading_outer_values_and_initializers(tmp_path) -> None:
    graph = gp.load_onnx(if_model())
    reasons = gp.analyse(graph).frozen_reasons()
    frozen = {p.value for p, why in reasons.items() if "`branch`" in why}
    assert {"a", "b"} <= frozen, "values read inside the If keep their channels"
    r = gp.run(graph, "prune-channels{ratio=0.5}", check_inputs=[
        [torch.randn(1, 3, 8, 8), torch.tensor(c), torch.randn(1, 8, 8, 8)] for c in (True, False)]).results[0]
    assert weight_rows(r.graph, "conv0") == 3 and weight_rows(r.graph, "conv3") == 4, "convs around the If prune"
    assert weight_rows(r.graph, "conv1") == 8 and weight_rows(r.graph, "conv2") == 8
    out = str(tmp_path / "if-slim.onnx")
    r.graph.to_onnx(out)
    saved = onnx.load(out)
    onnx.checker.check_model(saved)
    rng = np.random.default_rng(2)
    x, x2 = rng.standard_normal((1, 3, 8, 8)).astype(np.float32), rng.standard_normal((1, 8, 8, 8)).astype(np.float32)
    reference = r.reference()
    for cond in (True, False):
        got = ort_run(out, {"x": x, "cond": np.array(cond), "x2": x2})
        want = reference.run(torch.from_numpy(x), torch.tensor(cond), torch.from_numpy(x2))
        assert_rel_close(got, want, what=f"cond={cond}")


def loop_model() -> onnx.ModelProto:
    """conv1 -> relu -> a; Loop(3 times, carried s = 0): body s' = s + Conv(a, wb) with
    ``a`` and ``wb`` read from the enclosing graph, and inside it an If whose branch
    reads ``a`` too (nested subgraph); then conv3 (prunable) on the loop result."""
    inner_then = h.make_graph([h.make_node("Relu", ["a"], ["ia"])], "ithen", [], [_vi("ia", [1, 8, 8, 8])])
    inner_else = h.make_graph([h.make_node("Neg", ["a"], ["ib"])], "ielse", [], [_vi("ib", [1, 8, 8, 8])])
    body = h.make_graph(
        [_conv("a", "wb", "cb"), h.make_node("If", ["cond_in"], ["sel"], then_branch=inner_then, else_branch=inner_else),
         h.make_node("Add", ["cb", "sel"], ["d"]), h.make_node("Add", ["s_in", "d"], ["s_out"]),
         h.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [_vi("i", [], T.INT64), _vi("cond_in", [], T.BOOL), _vi("s_in", [1, 8, 8, 8])],
        [_vi("cond_out", [], T.BOOL), _vi("s_out", [1, 8, 8, 8])],
    )
    nodes = [
        _conv("x", "w0", "c0", "conv0"), h.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        _conv("r0", "w1", "c1", "conv1"), h.make_node("Relu", ["c1"], ["a"], name="relu1"),
        h.make_node("Loop", ["trips", "go", "zero"], ["s"], body=body, name="loop"),
        _conv("s", "w3", "z", "conv3"), h.make_node("Relu", ["z"], ["zr"], name="relu3"),
        h.make_node("Conv", ["zr", "w4"], ["out"], name="conv4"),
    ]
    inits = [_init("w0", 6, 3, 3, 3), _init("w1", 8, 6, 3, 3), _init("wb", 8, 8, 3, 3), _init("w3", 8, 8, 3, 3),
             _init("w4", 4, 8, 1, 1), nh.from_array(np.array(3, np.int64), "trips"), nh.from_array(np.array(True), "go"),
             nh.from_array(np.zeros((1, 8, 8, 8), np.float32), "zero")]
    g = h.make_graph(nodes, "loopm", [_vi("x", [1, 3, 8, 8])], [_vi("out", [1, 4, 8, 8])], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_loop_with_nested_if_reading_outer_values(tmp_path) -> None:
    graph = gp.load_onnx(loop_model())
    loop = graph.node("loop")
    assert loop.kind == "unknown" and "control flow" in loop.target and "a" in loop.inputs
    r = gp.run(graph, "prune-channels{ratio=0.5}").results[0]
    assert weight_rows(r.graph, "conv0") == 3 and weight_rows(r.graph, "conv3") == 4
    assert weight_rows(r.graph, "conv1") == 8, "`a` is read inside the loop body (and its nested If)"
    out = str(tmp_path / "loop-slim.onnx")
    r.graph.to_onnx(out)
    onnx.checker.check_model(onnx.load(out))
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert_rel_close(ort_run(out, {"x": x}), r.reference().run(torch.from_numpy(x)))


def test_optimize_cli_on_control_flow(tmp_path, capsys) -> None:
    from graphprune.cli import main

    path, out = str(tmp_path / "loop.onnx"), str(tmp_path / "loop-out.onnx")
    onnx.save(loop_model(), path)
    code = main(["optimize", path, "-o", out, "-p", "prune-channels{ratio=0.5}", "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0 and "modified" in stdout and "check: 3 probe inputs" in stdout
