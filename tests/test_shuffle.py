"""Channel shuffle ``view(n, g, c/g, h, w).transpose(1, 2).reshape(n, c, h, w)`` as a
permutation: input channel ``b * c/g + a`` is tied to every ``b' * c/g + a``, so the
shuffle keeps its form (``g`` groups of fewer channels) and the branches around it prune
exactly, on the export and ONNX frontends."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.coupling import analyse
from helpers import check_pass
from test_onnx_frontend import export, ort_run, rel


def shuffle(x: torch.Tensor, g: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, g, c // g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class Shuffled(nn.Module):
    """g branches concatenated, shuffled, and read by a 1x1 conv and a depthwise conv."""

    def __init__(self, g: int, per: int = 4) -> None:
        super().__init__()
        self.g = g
        self.branches = nn.ModuleList(nn.Conv2d(3, per, 1) for _ in range(g))
        self.dw = nn.Conv2d(g * per, g * per, 3, padding=1, groups=g * per)
        self.head = nn.Conv2d(g * per, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(b(x)) for b in self.branches], 1)
        return self.head(torch.relu(self.dw(shuffle(y, self.g))))


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's stride-1 unit: split, a branch on one half, concat, shuffle (g=2)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        half = c // 2
        self.branch = nn.Sequential(nn.Conv2d(half, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=6),
                                    nn.Conv2d(6, half, 1), nn.ReLU())
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        a, b = y.chunk(2, dim=1)
        return self.head(shuffle(torch.cat([a, self.branch(b)], 1), 2))


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p)
    return model.eval()


@pytest.mark.parametrize("g", [2, 3, 4])
def test_shuffle_ties_one_index_across_groups_and_prunes_exactly(g: int) -> None:
    per = 4
    model = _seeded(Shuffled(g, per), seed=g)
    graph = gp.trace(model, torch.randn(1, 3, 6, 6))
    group = analyse(graph).group_of(gp.Port(graph.find("branches.0").outputs[0], 1))
    assert group is not None and group.n_classes == per and group.prunable.all()
    for b in range(g):  # channel a of every branch is class a
        classes = group.class_of[gp.Port(graph.find(f"branches.{b}").outputs[0], 1)]
        assert classes.tolist() == group.class_of[gp.Port(graph.find("branches.0").outputs[0], 1)].tolist()
    result = check_pass(graph, "prune-channels{ratio=0.5}")
    out = result.graph
    for b in range(g):
        assert out.param(f"branches.{b}.weight").shape[0] == per // 2
    # the shuffle is still view -> transpose -> view with g groups
    views = [out.shape(n.outputs[0]) for n in out.nodes if n.kind == "reshape" and len(out.shape(n.outputs[0])) == 5]
    assert views == [(1, g, per // 2, 6, 6)]


def test_shuffle_decision_removes_the_weakest_index() -> None:
    """Index a's class sums its filters over all branches: shrink a=1 in every branch."""
    model = _seeded(Shuffled(3, 4))
    with torch.no_grad():
        for b in model.branches:
            b.weight[1] *= 1e-3
            b.bias[1] *= 1e-3
    graph = gp.trace(model, torch.randn(1, 3, 6, 6))
    result = check_pass(graph, "prune-channels{ratio=0.25}")
    (rec,) = [r for r in result.records if r["classes"] == 4]
    assert rec["kept"][f"{graph.find('branches.0').outputs[0]}:1"] == [0, 2, 3]


def test_shufflenet_unit_prunes_its_branch_exactly() -> None:
    model = _seeded(ShuffleUnit())
    graph = gp.trace(model, torch.randn(1, 3, 6, 6))
    result = check_pass(graph, "prune-channels{ratio=0.5}")
    assert result.graph.param("branch.0.weight").shape[0] == 3  # the branch's inner width


@pytest.mark.parametrize("g", [2, 4])
def test_shuffle_prunes_exactly_on_onnx(tmp_path, g: int) -> None:
    model = _seeded(Shuffled(g))
    x = torch.randn(1, 3, 6, 6)
    path = export(model, x, os.fspath(tmp_path / "m.onnx"))
    graph = gp.load_onnx(path)
    result = check_pass(graph, "prune-channels{ratio=0.5}")
    out = os.fspath(tmp_path / "out.onnx")
    result.graph.to_onnx(out)
    assert rel(ort_run(out, x)[0], result.reference().run(x)[0]) < 1e-5
    widths = [result.graph.param(n.params["weight"]).shape[0] for n in result.graph.nodes if n.kind == "conv"]
    assert widths[:g] == [2] * g
