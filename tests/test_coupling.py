"""Channel-coupling analysis: groups, classes and frozen channels on small graphs."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.rules import _reshape_segments


def trace(model: nn.Module, *shape: int) -> gp.Graph:
    return gp.trace(model.eval(), torch.randn(*shape))


def group_at(g: gp.Graph, label: str, axis: int = 1) -> gp.PruningGroup:
    node = g.find(label)
    group = gp.analyse(g).group_of(gp.Port(node.outputs[0], axis))
    assert group is not None
    return group


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


def test_concat_offsets() -> None:
    g = trace(Concat(), 1, 3, 4, 4)
    group = group_at(g, "a")
    assert group.n_classes == 10 and group.prunable.all()
    cat = next(n for n in g.nodes if n.kind == "concat")
    classes_cat = group.class_of[gp.Port(cat.outputs[0], 1)]
    classes_b = group.class_of[gp.Port(g.find("b").outputs[0], 1)]
    np.testing.assert_array_equal(classes_cat[4:], classes_b)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(y + torch.relu(self.b(y)))


def test_residual_add_ties_operands() -> None:
    g = trace(Residual(), 1, 3, 6, 6)
    group = group_at(g, "a")
    labels = {m.node.label for ms in group.members.values() for m in ms if m.coupling.slices}
    assert labels == {"a", "b", "c"}
    assert group.n_classes == 8


class Topk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return torch.topk(self.a(x), 2, dim=1).values


def test_unknown_op_freezes_with_reason() -> None:
    g = trace(Topk(), 1, 3, 4, 4)
    group = group_at(g, "a")
    assert group.frozen.all()
    assert any("topk" in r and "no channel rule" in r for r in group.reasons.values())


class LayerNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x)))


def test_layernorm_over_channels_freezes() -> None:
    g = trace(LayerNormed(), 2, 5, 4)
    group = group_at(g, "fc1", axis=2)
    assert group.frozen.all()
    assert any("normalises over axis 2" in r for r in group.reasons.values())


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.head(self.conv(self.conv(y)))


def test_shared_parameter_freezes() -> None:
    g = trace(SharedConv(), 1, 3, 4, 4)
    reasons = gp.analyse(g).frozen_reasons().values()
    assert any("shares parameter `conv.weight`" in r for r in reasons)


class ChannelShuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.b(y)


class Regroup(nn.Module):
    """A reshape that regroups the channel axis with another axis: no rule maps it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)

    def forward(self, x):
        return self.a(x).reshape(3, 4)


def test_regrouping_reshape_freezes() -> None:
    g = trace(Regroup(), 2, 6)
    group = group_at(g, "a")
    assert group.frozen.all()
    assert any("reshape" in r for r in group.reasons.values())


def test_channel_shuffle_is_a_permutation() -> None:
    """view(n, 2, 4, h, w).transpose(1, 2).reshape(n, 8, h, w): channels b*4 + a and
    b'*4 + a are one class (the shuffle keeps its form only if both go together)."""
    torch.manual_seed(0)
    g = trace(ChannelShuffle(), 1, 3, 4, 4)
    group = group_at(g, "a")
    assert group.n_classes == 4 and group.prunable.all()
    classes = group.class_of[gp.Port(g.find("a").outputs[0], 1)]
    assert (classes[:4] == classes[4:]).all() and len(set(classes[:4])) == 4
    result = gp.get_pass("prune-channels")(ratio=0.5)(g)
    assert result.graph.param("a.weight").shape[0] == 4
    assert gp.compare(result.graph, result.reference()) <= 1e-5


def test_reshape_segments() -> None:
    assert _reshape_segments((2, 8, 4, 4), (2, 128)) == [((0, 0), (0, 0)), ((1, 3), (1, 1))]
    assert _reshape_segments((2, 128), (2, 8, 16)) == [((0, 0), (0, 0)), ((1, 1), (1, 2))]
    assert _reshape_segments((2, 6), (3, 4)) == [((0, 1), (0, 1))]  # one regrouped run
    assert _reshape_segments((2, 6), (5, 4)) is None  # sizes that do not match


class Gathered(nn.Module):
    """A conv whose output channels are reordered by a constant index (a folded permutation)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)
        self.register_buffer("order", torch.tensor([5, 0, 3, 1, 4, 2]))

    def forward(self, x):
        return self.b(torch.index_select(self.a(x), 1, self.order))


def test_gather_links_channels_and_prunes_exactly() -> None:
    torch.manual_seed(0)
    g = trace(Gathered(), 2, 3, 4, 4)
    group = group_at(g, "a")
    assert group.n_classes == 6 and group.prunable.all()
    result = gp.get_pass("prune-channels")(ratio=0.5)(g)
    assert result.graph.param("a.weight").shape[0] == 3
    assert gp.compare(result.graph, result.reference()) <= 1e-5
    order = result.graph.param("order")
    assert sorted(order.tolist()) == [0, 1, 2]
