"""fx capture and emit: tracing errors, leaf modules, nn.Module and ONNX out."""
from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.samples.models import sample_input, sample_net
from helpers import assert_rel_close


class DataDependent(nn.Module):
    """Control flow on a tensor value: symbolic tracing cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return x


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.tricky = DataDependent()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tricky(self.stem(x))


def test_untraceable_model_names_module_and_remedy() -> None:
    with pytest.raises(gp.CaptureError) as info:
        gp.trace(Outer(), torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "`tricky`" in msg and "DataDependent" in msg and "leaf_modules" in msg


def test_leaf_module_option_makes_it_traceable() -> None:
    g = gp.trace(Outer(), torch.randn(1, 3, 8, 8), leaf_modules=[DataDependent])
    kinds = {n.label: n.kind for n in g.nodes}
    assert kinds["tricky"] == "unknown"
    g2 = gp.trace(Outer(), torch.randn(1, 3, 8, 8), leaf_modules=["tricky"])
    assert {n.label: n.kind for n in g2.nodes}["tricky"] == "unknown"
    # the opaque leaf freezes the channels that reach it
    analysis = gp.analyse(g)
    reasons = analysis.frozen_reasons().values()
    assert any("tricky" in r and "no channel rule" in r for r in reasons)


def test_trace_does_not_touch_caller_model() -> None:
    model = sample_net()
    before = copy.deepcopy(model.state_dict())
    g = gp.trace(model, sample_input())
    gp.run(g, "prune-channels{ratio=0.5}")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_wrong_number_of_inputs() -> None:
    with pytest.raises(gp.CaptureError, match="takes 1 inputs"):
        gp.trace(sample_net(), (sample_input(), sample_input()))


def test_to_module_runs_pickles_and_trains() -> None:
    model = sample_net()
    g = gp.run(gp.trace(model, sample_input()), "prune-channels{ratio=0.5}").graph
    module = g.to_module()
    x = sample_input()
    ref = g.run(x)[0]
    with torch.no_grad():
        assert_rel_close(module.eval()(x), ref)
    clone = pickle.loads(pickle.dumps(module))
    with torch.no_grad():
        assert_rel_close(clone(x), ref)
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    loss = module(x).square().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(module.eval()(x)).all()


def test_to_onnx_runs_in_onnxruntime(tmp_path) -> None:
    g = gp.run(gp.trace(sample_net(), sample_input()), "prune-channels{ratio=0.5}").graph
    path = tmp_path / "pruned.onnx"
    g.to_onnx(str(path))
    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = sample_input()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert_rel_close(got, g.run(x)[0])
    assert not list(tmp_path.glob(".graphprune-*")), "temporary file left behind"


def test_view_kinds_of_sample_net() -> None:
    g = gp.trace(sample_net(), sample_input())
    kinds = {n.kind for n in g.nodes}
    assert {"conv", "batchnorm", "act", "add", "mul", "concat", "flatten", "linear", "pool", "reduce"} <= kinds
    assert "unknown" not in kinds
    dw = g.find("dw.0")
    assert dw.attrs["groups"] == 32 and dw.attrs["pads"] == (1, 1, 1, 1)
