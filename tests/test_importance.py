"""Importance criteria: hand-computed scores, and the channels prune-channels keeps.

The model is built by hand so every score can be computed with numpy in the test:

* a residual stream written by two convs (``c0`` and ``c1``, through ``bn0``/``bn1``)
  whose filter sizes differ by a factor of about 100, so the per-member mean
  normalisation decides the ranking, and summing over the two members matters;
* a hidden group written by one conv ``ch`` (no normalisation) whose filters are either
  spiky or flat, so L1 and L2 rank them differently; ``bn_scale`` falls back to L1 there.

Each test also checks that the plausible wrong formula (L2 for L1, no normalisation, one
member only) would have kept *other* channels, so the test can tell them apart.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.importance import get_importance

# filter scales of the stream's two producers (every entry of filter i is +-scale[i])
S0 = np.array([1.0, 5.0, 2.0, 4.0])
S1 = 100.0 * np.array([3.0, 1.0, 4.0, 1.5])
# batch norm scales of the stream (a negative one: the criterion takes |gamma|)
G0 = np.array([0.5, 0.1, -2.0, 1.0])
G1 = np.array([30.0, 2.0, 1.0, 10.0])
# the hidden conv's 1x1 filters: spiky (one large entry) or flat (four medium ones)
CH = np.array([
    [3.0, 0.0, 0.0, 0.0],
    [0.0, 2.5, 0.0, 0.0],
    [0.0, 0.0, 0.5, 0.0],
    [0.9, 0.9, -0.9, 0.9],
    [0.8, -0.8, 0.8, 0.8],
    [0.1, 0.1, 0.1, 0.1],
])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.ch = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn0(self.c0(x)))
        y = torch.relu(s + self.bn1(self.c1(s)))
        h = torch.relu(self.ch(y))
        return self.fc(h.mean((2, 3)))


def signs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).choice([-1.0, 1.0], size=shape)).float()


def build() -> tuple[nn.Module, gp.Graph]:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.c0.weight.copy_(signs((4, 3, 3, 3), 1) * torch.tensor(S0, dtype=torch.float32).view(4, 1, 1, 1))
        model.c1.weight.copy_(signs((4, 4, 3, 3), 2) * torch.tensor(S1, dtype=torch.float32).view(4, 1, 1, 1))
        model.bn0.weight.copy_(torch.tensor(G0))
        model.bn1.weight.copy_(torch.tensor(G1))
        model.ch.weight.copy_(torch.tensor(CH, dtype=torch.float32).view(6, 4, 1, 1))
    return model, gp.trace(model, torch.randn(2, 3, 6, 6))


def filter_norms(w: torch.Tensor, p: int) -> np.ndarray:
    rows = w.detach().double().numpy().reshape(w.shape[0], -1)
    return np.abs(rows).sum(1) if p == 1 else np.sqrt((rows ** 2).sum(1))


def group_and_channel(graph: gp.Graph, label: str) -> tuple[gp.PruningGroup, np.ndarray]:
    """The group of ``label``'s output channels, and the class of each of its channels."""
    port = gp.Port(graph.find(label).outputs[0], 1)
    group = gp.analyse(graph).group_of(port)
    assert group is not None
    return group, group.class_of[port]


def top(scores: np.ndarray, n: int) -> set[int]:
    assert len(set(np.round(scores, 9))) == len(scores), "ties make the ranking ambiguous"
    return set(np.argsort(-scores)[:n].tolist())


def kept_channels(result: gp.PassResult, graph: gp.Graph, label: str) -> set[int]:
    key = f"{graph.find(label).outputs[0]}:1"
    for rec in result.records:
        if key in rec["kept"]:
            return set(rec["kept"][key])
    return set(range(graph.param(f"{label}.weight").shape[0]))


# ------------------------------------------------------------------ expected
def expected_stream(p: int, model: nn.Module) -> np.ndarray:
    n0, n1 = filter_norms(model.c0.weight, p), filter_norms(model.c1.weight, p)
    return n0 / n0.mean() + n1 / n1.mean()


def expected_hidden(p: int, model: nn.Module) -> np.ndarray:
    n = filter_norms(model.ch.weight, p)  # the float32 weights, read in float64
    return n / n.mean()


def test_hand_values_are_what_the_formulas_say() -> None:
    """The fixture's numbers: uniform-magnitude filters have L1 = scale * size."""
    model, _ = build()
    np.testing.assert_allclose(filter_norms(model.c0.weight, 1), S0 * 27, rtol=1e-6)
    np.testing.assert_allclose(filter_norms(model.c1.weight, 2), S1 * 6, rtol=1e-6)


@pytest.mark.parametrize("criterion, p", [("l1", 1), ("l2", 2)])
def test_magnitude_scores_sum_normalised_members(criterion: str, p: int) -> None:
    model, graph = build()
    score = get_importance(criterion)
    group, cls = group_and_channel(graph, "c0")
    got = score(graph, group)
    assert got.shape == (group.n_classes,)
    np.testing.assert_allclose(got[cls], expected_stream(p, model), rtol=1e-12)
    hidden, hcls = group_and_channel(graph, "ch")
    np.testing.assert_allclose(score(graph, hidden)[hcls], expected_hidden(p, model), rtol=1e-12)


def test_bn_scale_scores_and_l1_fallback() -> None:
    model, graph = build()
    score = get_importance("bn_scale")
    group, cls = group_and_channel(graph, "c0")
    g0, g1 = (np.abs(bn.weight.detach().double().numpy()) for bn in (model.bn0, model.bn1))
    want = g0 / g0.mean() + g1 / g1.mean()
    np.testing.assert_allclose(score(graph, group)[cls], want, rtol=1e-12)
    hidden, hcls = group_and_channel(graph, "ch")  # no normalisation: l1 of `ch`
    np.testing.assert_allclose(score(graph, hidden)[hcls], expected_hidden(1, model), rtol=1e-12)


def test_unknown_criterion_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown criterion `l3` \(known: bn_scale, kl, l1, l2, taylor\)"):
        get_importance("l3")


def test_all_zero_member_adds_nothing() -> None:
    """A member whose filters are all zero (mean 0) contributes zeros, not NaN."""
    model, _ = build()
    with torch.no_grad():
        model.c1.weight.zero_()
        model.bn1.weight.zero_()
    graph = gp.trace(model, torch.randn(2, 3, 6, 6))
    group, cls = group_and_channel(graph, "c0")
    n0 = filter_norms(model.c0.weight, 1)
    np.testing.assert_allclose(get_importance("l1")(graph, group)[cls], n0 / n0.mean(), rtol=1e-12)
    g0 = np.abs(model.bn0.weight.detach().double().numpy())
    np.testing.assert_allclose(get_importance("bn_scale")(graph, group)[cls], g0 / g0.mean(), rtol=1e-12)


class ConcatNet(nn.Module):
    """A concat of a normalised branch (``a`` + ``bn``) and a plain one (``b``), and a
    per-channel layer scale (a constant the stream's group owns) on the joined stream."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.tensor([0.1, 4.0, 0.2, 3.0, 0.3, 2.0, 0.4]).view(1, 7, 1, 1))
        self.fc = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.bn(self.a(x)), self.b(x)], 1) * self.scale
        return self.fc(torch.relu(y).mean((2, 3)))


def concat_graph() -> tuple[ConcatNet, gp.Graph]:
    torch.manual_seed(1)
    model = ConcatNet().eval()
    with torch.no_grad():
        model.a.weight.copy_(signs((3, 3, 3, 3), 4) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1))
        model.b.weight.copy_(signs((4, 3, 3, 3), 5) * torch.tensor([4.0, 1.0, 3.0, 2.0]).view(4, 1, 1, 1))
        model.bn.weight.copy_(torch.tensor([2.0, 0.5, 1.0]))
    return model, gp.trace(model, torch.randn(2, 3, 6, 6))


def test_concat_scores_with_a_per_channel_constant() -> None:
    """l1 over a concat: each branch's filters fill its own channels, normalised per
    branch; the layer scale (a constant, role `value`) adds |s_c| / mean |s| on every channel."""
    model, graph = concat_graph()
    group, cls = group_and_channel(graph, "cat")
    na, nb = filter_norms(model.a.weight, 1), filter_norms(model.b.weight, 1)
    s = np.abs(model.scale.detach().double().numpy().reshape(-1))
    want = np.concatenate([na / na.mean(), nb / nb.mean()]) + s / s.mean()
    np.testing.assert_allclose(get_importance("l1")(graph, group)[cls], want, rtol=1e-12)


def test_bn_scale_mixes_gammas_and_l1_fallback_per_class() -> None:
    """bn_scale on a concat: |gamma| / mean |gamma| where a norm covers the channel, l1
    of the group's producers where none does."""
    model, graph = concat_graph()
    group, cls = group_and_channel(graph, "cat")
    l1 = get_importance("l1")(graph, group)[cls]
    g = np.abs(model.bn.weight.detach().double().numpy())
    want = np.concatenate([g / g.mean(), l1[3:]])
    np.testing.assert_allclose(get_importance("bn_scale")(graph, group)[cls], want, rtol=1e-12)


# ------------------------------------------------------------- kept channels
def test_l1_and_l2_keep_different_channels() -> None:
    model, graph = build()
    r1 = gp.run(graph, "prune-channels{ratio=0.5,criterion=l1}").results[0]
    r2 = gp.run(graph, "prune-channels{ratio=0.5,criterion=l2}").results[0]
    want1, want2 = top(expected_hidden(1, model), 3), top(expected_hidden(2, model), 3)
    assert want1 != want2  # the spiky/flat filters tell the norms apart
    assert kept_channels(r1, graph, "ch") == want1
    assert kept_channels(r2, graph, "ch") == want2


@pytest.mark.parametrize("criterion, p", [("l1", 1), ("l2", 2)])
def test_stream_keeps_the_normalised_sum_winners(criterion: str, p: int) -> None:
    model, graph = build()
    r = gp.run(graph, f"prune-channels{{ratio=0.5,criterion={criterion}}}").results[0]
    want = top(expected_stream(p, model), 2)
    n0, n1 = filter_norms(model.c0.weight, p), filter_norms(model.c1.weight, p)
    # what the usual mistakes would keep: raw norms (c1 dominates), or one member only
    assert want != top(n0 + n1, 2) and want != top(n1, 2) and want != top(n0, 2)
    kept = {label: kept_channels(r, graph, label) for label in ("c0", "c1", "bn0", "bn1")}
    assert all(k == want for k in kept.values()), kept


def test_bn_scale_keeps_largest_gamma_sum() -> None:
    model, graph = build()
    r = gp.run(graph, "prune-channels{ratio=0.5,criterion=bn_scale}").results[0]
    want = top(np.abs(G0) / np.abs(G0).mean() + np.abs(G1) / np.abs(G1).mean(), 2)
    assert want != top(expected_stream(1, model), 2)  # gammas, not filters, decide
    assert want != top(np.abs(G0) + np.abs(G1), 2)  # not normalised per member
    assert want != top(np.abs(G0), 2) and want != top(np.abs(G1), 2)  # one member only
    assert kept_channels(r, graph, "c0") == want
    assert kept_channels(r, graph, "ch") == top(expected_hidden(1, model), 3)
