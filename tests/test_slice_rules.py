"""Channel slices as offsets: ``x[:, a:b]``, a partial-channel residual add (ReXNet's
``cat([x[:, :c] + shortcut, x[:, c:]])``) and concat-then-slice (GhostNet's
``cat([x1, x2])[:, :out]``) prune exactly on the export and ONNX frontends; the slice
bounds follow the kept channels, and channels no slice reads are removed."""
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


class TwoSlices(nn.Module):
    """Two convs read overlapping channel ranges ``[a, b)`` and ``[c, 8)`` of one conv."""

    def __init__(self, a: int, b: int, c: int) -> None:
        super().__init__()
        self.a, self.b, self.c = a, b, c
        self.conv = nn.Conv2d(3, 8, 1)
        self.left = nn.Conv2d(b - a, 4, 1)
        self.right = nn.Conv2d(8 - c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.left(y[:, self.a:self.b]) + self.right(y[:, self.c:])


class PartialAdd(nn.Module):
    """ReXNet's shortcut: the input is added into the first ``c`` channels of a wider tensor."""

    def __init__(self, c: int = 4, wide: int = 7) -> None:
        super().__init__()
        self.c = c
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.expand = nn.Conv2d(c, 12, 1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.pwl = nn.Conv2d(12, wide, 1)
        self.head = nn.Conv2d(wide, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        y = self.pwl(torch.relu(self.dw(torch.relu(self.expand(s)))))
        y = torch.cat([y[:, 0:self.c] + s, y[:, self.c:]], dim=1)
        return self.head(y).mean((2, 3))


class Ghost(nn.Module):
    """GhostNet's module with an odd width: ``cat([x1, dw(x1)])[:, :out]`` drops the last."""

    def __init__(self, out: int = 7) -> None:
        super().__init__()
        self.out = out
        init = (out + 1) // 2
        self.primary = nn.Conv2d(3, init, 1)
        self.cheap = nn.Conv2d(init, init, 3, padding=1, groups=init)
        self.head = nn.Conv2d(out, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = torch.relu(self.primary(x))
        out = torch.cat([x1, torch.relu(self.cheap(x1))], dim=1)
        return self.head(out[:, :self.out])


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p)
    return model.eval()


@pytest.mark.parametrize("a,b,c", [(0, 5, 5), (2, 7, 5), (1, 4, 3), (3, 8, 6)])
def test_overlapping_slices_prune_exactly(a: int, b: int, c: int) -> None:
    model = _seeded(TwoSlices(a, b, c), seed=a + b + c)
    graph = gp.trace(model, torch.randn(1, 3, 6, 6), capture="export")
    group = next(g for g in analyse(graph).groups if g.n_classes == 8)
    assert group.prunable.sum() == 8, "every channel of the sliced conv is prunable"
    result = check_pass(graph, "prune-channels{ratio=0.5}")
    (rec,) = [r for r in result.records if r["classes"] == 8]
    kept = rec["kept"]["conv2d:1"] if "conv2d:1" in rec["kept"] else list(range(8))
    read = set(range(a, b)) | set(range(c, 8))
    assert set(kept) <= read, "channels no slice reads are removed"
    # the slices now read exactly the kept channels of their old ranges, in order
    out = result.graph
    slices = [n for n in out.nodes if n.kind == "slice" or (n.kind == "identity" and n.target == "aten.slice")]
    widths = sorted(out.shape(n.outputs[0])[1] for n in slices)
    assert widths == sorted([sum(a <= k < b for k in kept), sum(k >= c for k in kept)])


def test_slice_decision_follows_the_read_columns() -> None:
    """Channels of ``y[:, 2:7]`` whose filters are smallest go; the slice bounds shift by
    the removed channels before the range."""
    model = _seeded(TwoSlices(2, 7, 7))
    with torch.no_grad():
        model.conv.weight[[0, 3, 5]] *= 1e-3
        model.conv.bias[[0, 3, 5]] *= 1e-3
    graph = gp.trace(model, torch.randn(1, 3, 6, 6), capture="export")
    result = check_pass(graph, "prune-channels{ratio=0.4}")  # floor(0.4 * 8) = 3
    (rec,) = [r for r in result.records if r["classes"] == 8]
    assert rec["kept"]["conv2d:1"] == [2, 4, 6, 7]  # 0, 3, 5 are small; 1 is read by no slice
    (sl, sr) = sorted((n for n in result.graph.nodes if n.kind == "slice"), key=lambda n: n.name)
    assert sl.attrs["ranges"][1][:2] == (0, 3) and sr.attrs["ranges"][1][:2] == (3, 4)


def test_partial_channel_add_ties_the_shortcut_to_the_first_channels() -> None:
    model = _seeded(PartialAdd())
    graph = gp.trace(model, torch.randn(1, 3, 8, 8))
    analysis = analyse(graph)
    stem = graph.find("stem")
    group = analysis.group_of(gp.Port(stem.outputs[0], 1))
    pwl = graph.find("pwl")
    assert group is not None and gp.Port(pwl.outputs[0], 1) in group.sizes, "the shortcut add ties stem and pwl"
    pwl_classes = group.class_of[gp.Port(pwl.outputs[0], 1)]
    stem_classes = group.class_of[gp.Port(stem.outputs[0], 1)]
    assert (pwl_classes[:4] == stem_classes).all() and len(set(pwl_classes[4:]) & set(stem_classes)) == 0
    assert group.prunable.all()
    result = check_pass(graph, "prune-channels{ratio=0.3}")
    assert result.graph.shape(result.graph.find("pwl").outputs[0])[1] < 7


def test_ghost_concat_then_slice_keeps_the_depthwise_pairs() -> None:
    """Channel i of the cheap depthwise conv is tied to primary channel i; the slice drops
    cat channel 7 (cheap channel 3), so its width is 2 * kept - [3 kept]."""
    model = _seeded(Ghost(7))
    graph = gp.trace(model, torch.randn(1, 3, 8, 8), capture="export")
    result = check_pass(graph, "prune-channels{ratio=0.5}")
    out = result.graph
    kept = out.shape(out.find("primary").outputs[0])[1]
    assert kept == 2
    (rec,) = [r for r in result.records if r["classes"] == 4]
    primary_kept = next(v for k, v in rec["kept"].items() if k.startswith(out.find("primary").outputs[0]))
    (sl,) = [n for n in out.nodes if n.target == "aten.slice"]
    assert out.shape(sl.outputs[0])[1] == 2 * kept - (3 in primary_kept)
    assert out.param(out.find("head").params["weight"]).shape[1] == 2 * kept - (3 in primary_kept)


@pytest.mark.parametrize("model_fn", [lambda: TwoSlices(2, 7, 5), lambda: PartialAdd(), lambda: Ghost(7)])
def test_slices_prune_exactly_on_onnx(tmp_path, model_fn) -> None:
    model = _seeded(model_fn())
    x = torch.randn(1, 3, 8, 8)
    path = export(model, x, os.fspath(tmp_path / "m.onnx"))
    graph = gp.load_onnx(path)
    assert any(n.kind == "slice" and n.attrs.get("ranges") for n in graph.nodes)
    before = gp.graph_cost(graph).macs
    result = check_pass(graph, "prune-channels{ratio=0.3}")
    assert gp.graph_cost(result.graph).macs < before
    out = os.fspath(tmp_path / "out.onnx")
    result.graph.to_onnx(out)
    want = result.reference().run(x)[0]
    assert rel(ort_run(out, x)[0], want) < 1e-5


def test_stepped_slice_freezes() -> None:
    class Stepped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x)[:, ::2])

    graph = gp.trace(_seeded(Stepped()), torch.randn(1, 3, 4, 4))
    conv = graph.find("conv")
    group = analyse(graph).group_of(gp.Port(conv.outputs[0], 1))
    assert group is not None and group.frozen.all()
    assert any("step" in r for r in group.reasons.values())


@pytest.mark.parametrize("model_fn", [lambda: TwoSlices(2, 7, 5), lambda: PartialAdd(), lambda: Ghost(7)])
def test_slices_prune_exactly_on_fx(model_fn) -> None:
    """The fx fallback reads ``x[:, a:b]`` (operator.getitem with literal slices) the same way."""
    model = _seeded(model_fn())
    graph = gp.trace(model, torch.randn(1, 3, 8, 8), capture="fx")
    assert any(n.kind == "slice" and n.attrs["ranges"] for n in graph.nodes)
    result = check_pass(graph, "prune-channels{ratio=0.3}")
    module = result.graph.to_module()
    x = torch.randn(1, 3, 8, 8)
    assert rel(module(x).detach(), result.reference().run(x)[0]) < 1e-5
