"""The ONNX exporter's group norm (Reshape to (N, G, -1) -> InstanceNormalization ->
Reshape back to Shape(x) -> Mul/Add affine) prunes by whole groups, exactly, as the
torch frontends prune ``nn.GroupNorm``."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.coupling import analyse
from helpers import check_pass
from test_onnx_frontend import export, ort_run, rel


class GN(nn.Module):
    def __init__(self, c: int = 12, groups: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.GroupNorm(groups, c)
        self.b = nn.Conv2d(c, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.norm(self.a(x))))


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p)
    return model.eval()


@pytest.mark.parametrize("c,groups", [(12, 4), (12, 3), (8, 8), (16, 2)])
def test_onnx_group_norm_prunes_whole_groups(tmp_path, c: int, groups: int) -> None:
    model = _seeded(GN(c, groups), seed=c + groups)
    x = torch.randn(1, 3, 6, 6)
    graph = gp.load_onnx(export(model, x, os.fspath(tmp_path / "gn.onnx")))
    assert any(n.target == "InstanceNormalization" for n in graph.nodes)
    conv = graph.find("/a/Conv")
    group = analyse(graph).group_of(gp.Port(conv.outputs[0], 1))
    assert group is not None and group.n_classes == groups and group.prunable.all()
    assert group.class_of[gp.Port(conv.outputs[0], 1)].tolist() == [i // (c // groups) for i in range(c)]
    result = check_pass(graph, "prune-channels{ratio=0.5}")
    (rec,) = [r for r in result.records if r["classes"] == groups]
    kept = rec["kept"][f"{conv.outputs[0]}:1"]
    cpg = c // groups
    assert len(kept) == (groups - groups // 2) * cpg
    assert all(kept[i:i + cpg] == list(range(kept[i], kept[i] + cpg)) and kept[i] % cpg == 0 for i in range(0, len(kept), cpg))
    out = os.fspath(tmp_path / "out.onnx")
    result.graph.to_onnx(out)
    assert rel(ort_run(out, x)[0], result.reference().run(x)[0]) < 1e-5


def test_onnx_and_export_keep_the_same_number_of_groups(tmp_path) -> None:
    model = _seeded(GN(12, 4))
    x = torch.randn(1, 3, 6, 6)
    onnx_graph = gp.load_onnx(export(model, x, os.fspath(tmp_path / "gn.onnx")))
    torch_graph = gp.trace(model, x)
    a = check_pass(onnx_graph, "prune-channels{ratio=0.5}").graph
    b = check_pass(torch_graph, "prune-channels{ratio=0.5}").graph
    wa = [a.param(n.params["weight"]).shape for n in a.nodes if n.kind == "conv"]
    wb = [b.param(n.params["weight"]).shape for n in b.nodes if n.kind == "conv"]
    assert wa == wb and wa[0][0] == 6
